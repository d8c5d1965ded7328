//! The `algorithm` and `learner` sections of a run config.

use medrl_vqa::{AdvantageConfig, PromptTemplate, RewardConfig};
use serde::{Deserialize, Serialize};

use crate::care::{CareConfig, EmaConfig};
use crate::loss::PolicyLossConfig;
use crate::optim::{AdamWConfig, MomentDType, Placement};
use crate::schedule::ScheduleConfig;
use crate::{Error, Result};

/// Which update the learner runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlgorithmName {
    /// Group-relative policy optimisation with rule rewards.
    Grpo,
    /// GRPO with the consistency bonus from an EMA reference model (the paper's run).
    #[default]
    GrpoCare,
    /// Cross-entropy on gold responses.
    Sft,
}

/// The `algorithm` section: rewards, advantages, loss and the GRPO-CARE settings.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlgorithmConfig {
    pub name: AlgorithmName,
    /// How a record becomes the user text of a rollout prompt.
    pub template: PromptTemplate,
    /// A system message replacing the chat template's default.
    pub system_prompt: Option<String>,
    pub rewards: RewardConfig,
    pub advantage: AdvantageConfig,
    pub loss: PolicyLossConfig,
    pub care: CareConfig,
    pub ema: EmaConfig,
}

/// Which weights the learner updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trainable {
    /// Every weight, vision tower included (the paper's run).
    #[default]
    All,
    /// Everything but the vision tower (`visual.*`).
    NoVision,
    /// Low-rank adapters on the decoder's linear layers; the base stays frozen.
    Lora,
}

/// LoRA settings, as PEFT names them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// Decoder module names to adapt (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj`).
    pub targets: Vec<String>,
    /// Seed of the A matrices (B starts at zero, so the adapted model starts equal to the base).
    pub seed: u64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            rank: 16,
            alpha: 32.0,
            targets: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"].map(String::from).to_vec(),
            seed: 0,
        }
    }
}

/// Optimizer kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// AdamW with f32 master weights (HF Trainer's default).
    #[default]
    Adamw,
    /// Plain SGD, for checks against references.
    Sgd,
}

/// The optimizer, one flat table (SGD reads only `lr`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizerConfig {
    pub kind: OptimizerKind,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub moments: MomentDType,
    /// Keep AdamW's master weights and moments, and the gradient sums, in host memory and step on
    /// the CPU (ZeRO-Offload style): how a full 7B fine-tune fits one 80 GB GPU (`docs/memory.md`).
    pub offload: bool,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        let a = AdamWConfig::default();
        OptimizerConfig { kind: OptimizerKind::Adamw, lr: a.lr, beta1: a.beta1, beta2: a.beta2, eps: a.eps, weight_decay: a.weight_decay, moments: a.moments, offload: false }
    }
}

impl OptimizerConfig {
    /// The AdamW settings of this table.
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig { lr: self.lr, beta1: self.beta1, beta2: self.beta2, eps: self.eps, weight_decay: self.weight_decay, moments: self.moments }
    }

    /// Where the optimizer state and the gradient sums live: offloading is AdamW's (SGD keeps no
    /// state and steps where its weights are).
    pub fn placement(&self) -> Placement {
        if self.offload && self.kind == OptimizerKind::Adamw { Placement::Host } else { Placement::WithWeights }
    }
}

/// The `learner` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LearnerConfig {
    pub trainable: Trainable,
    pub lora: LoraConfig,
    pub optimizer: OptimizerConfig,
    pub schedule: ScheduleConfig,
    /// Optimizer steps of the whole run (for the schedule).
    pub total_steps: u64,
    /// Global gradient-norm clip; 0 measures without clipping.
    pub max_grad_norm: f64,
    /// Recompute each decoder layer in the backward pass instead of keeping its activations.
    pub gradient_checkpointing: bool,
    /// Sequences per forward/backward pass; a step's sequences are split into such micro-batches.
    pub micro_batch_sequences: usize,
    /// Checkpoint every this many steps (0: only at the end).
    pub save_every: u64,
}

impl Default for LearnerConfig {
    fn default() -> Self {
        LearnerConfig {
            trainable: Trainable::All,
            lora: LoraConfig::default(),
            optimizer: OptimizerConfig::default(),
            schedule: ScheduleConfig::default(),
            total_steps: 1000,
            max_grad_norm: 5.0,
            gradient_checkpointing: true,
            micro_batch_sequences: 8,
            save_every: 200,
        }
    }
}

impl LearnerConfig {
    /// Checks values serde cannot.
    pub fn validate(&self) -> Result<()> {
        if self.micro_batch_sequences == 0 {
            return Err(Error::config("learner.micro_batch_sequences", "must be at least 1"));
        }
        if self.total_steps == 0 {
            return Err(Error::config("learner.total_steps", "must be at least 1"));
        }
        if !(self.optimizer.lr.is_finite() && self.optimizer.lr >= 0.0) {
            return Err(Error::config("learner.optimizer.lr", format!("must be finite and >= 0, got {}", self.optimizer.lr)));
        }
        if self.trainable == Trainable::Lora && (self.lora.rank == 0 || self.lora.targets.is_empty()) {
            return Err(Error::config("learner.lora", "rank must be >= 1 and targets non-empty"));
        }
        self.optimizer.adamw().validate()
    }
}
