//! The run config: one YAML schema for every role and command (`run`, `model`, `algorithm`,
//! `learner`, ...). Unknown keys are errors naming the key and the file; `--set a.b=c` overrides
//! any value from the command line.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use candle_core::{DType, Device};
use medrl_coordinator::CoordinatorConfig;
use medrl_eval::EvalConfig;
use medrl_rollout::RolloutConfig;
use medrl_learner::config::{AlgorithmConfig, LearnerConfig};

use crate::cluster::ClusterSection;
use crate::runtime::DeviceArgs;
use crate::train::data::DataSection;
use crate::train::sft::SftSection;
use serde::{Deserialize, Serialize};

/// The `run` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunSection {
    pub name: String,
    /// The run directory: resolved config, checkpoints, metrics.jsonl.
    pub output_dir: PathBuf,
    pub seed: u64,
}

impl Default for RunSection {
    fn default() -> Self {
        RunSection { name: "run".into(), output_dir: PathBuf::from("runs/run"), seed: 0 }
    }
}

/// The `model` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// A Hugging Face model directory; none means the tiny model created in the run directory.
    pub path: Option<PathBuf>,
    /// f32, bf16 or f16.
    pub dtype: String,
    /// cpu or cuda[:N].
    pub device: String,
    /// Overrides the model's `preprocessor_config.json` (the released run sets 802,816 per image).
    pub min_pixels: Option<usize>,
    pub max_pixels: Option<usize>,
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection { path: None, dtype: "f32".into(), device: "cpu".into(), min_pixels: None, max_pixels: None }
    }
}

impl ModelSection {
    /// The compute dtype and device the section names, parsed as `--dtype` and `--device` are.
    pub fn dtype_device(&self) -> Result<(DType, Device)> {
        let args = DeviceArgs { device: self.device.clone(), dtype: self.dtype.clone() };
        Ok((args.dtype()?, args.device()?))
    }
}

/// A whole run config.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    pub run: RunSection,
    pub model: ModelSection,
    pub data: DataSection,
    pub sft: SftSection,
    pub algorithm: AlgorithmConfig,
    pub rollout: RolloutConfig,
    pub learner: LearnerConfig,
    pub coordinator: CoordinatorConfig,
    pub cluster: ClusterSection,
    pub eval: EvalConfig,
}

impl RunConfig {
    /// Reads `path`, applies `overrides` (`a.b=c`, the value parsed as YAML) and checks the result.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        Self::parse(&text, overrides).with_context(|| format!("config {}", path.display()))
    }

    /// `path`'s config, or the embedded default (`configs/default.yaml`) when there is none.
    pub fn load_or_default(path: Option<&Path>, overrides: &[String]) -> Result<Self> {
        match path {
            Some(p) => Self::load(p, overrides),
            None => Self::parse(crate::cmd::train::DEFAULT_CONFIG, overrides).context("the embedded default config"),
        }
    }

    /// Parses YAML text with overrides.
    pub fn parse(text: &str, overrides: &[String]) -> Result<Self> {
        let mut value: yaml_serde::Value = yaml_serde::from_str(text)?;
        if value.is_null() {
            value = yaml_serde::Value::Mapping(Default::default());
        }
        for o in overrides {
            apply_override(&mut value, o)?;
        }
        // Through serde_path_to_error so a wrong type names its key (`rollout.group_size`), which
        // deserializing a parsed value alone would not.
        let config: RunConfig = serde_path_to_error::deserialize(value).map_err(|e| anyhow!("field `{}`: {}", e.path(), e.inner()))?;
        config.learner.validate().map_err(|e| anyhow!("{e}"))?;
        config.coordinator.validate().map_err(|e| anyhow!("coordinator.{e}"))?;
        Ok(config)
    }
}

fn apply_override(root: &mut yaml_serde::Value, assignment: &str) -> Result<()> {
    let Some((path, raw)) = assignment.split_once('=') else { bail!("--set {assignment}: expected key.path=value") };
    let value: yaml_serde::Value = yaml_serde::from_str(raw).with_context(|| format!("--set {assignment}: the value is not YAML"))?;
    let mut node = root;
    let keys: Vec<&str> = path.split('.').collect();
    for (i, key) in keys.iter().enumerate() {
        let map = match node {
            yaml_serde::Value::Mapping(m) => m,
            _ => bail!("--set {assignment}: `{}` is not a section", keys[..i].join(".")),
        };
        let k = yaml_serde::Value::String((*key).to_string());
        if i + 1 == keys.len() {
            map.insert(k, value);
            return Ok(());
        }
        node = map.entry(k).or_insert_with(|| yaml_serde::Value::Mapping(Default::default()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_and_wrong_types_name_the_key() {
        let e = RunConfig::parse("learner:\n  optimzer: {lr: 1.0}\n", &[]).expect_err("typo");
        assert!(format!("{e:#}").contains("optimzer"), "{e:#}");
        let e = RunConfig::parse("learner:\n  max_grad_norm: lots\n", &[]).expect_err("type");
        assert!(format!("{e:#}").contains("max_grad_norm"), "{e:#}");
    }

    #[test]
    fn overrides_reach_nested_values() -> Result<()> {
        let c = RunConfig::parse("algorithm: {name: grpo}\n", &["learner.optimizer.lr=0.5".into(), "algorithm.name=sft".into()])?;
        assert_eq!(c.learner.optimizer.lr, 0.5);
        assert_eq!(c.algorithm.name, medrl_learner::config::AlgorithmName::Sft);
        assert!(RunConfig::parse("", &["nonsense".into()]).is_err());
        Ok(())
    }
}
