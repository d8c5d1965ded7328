//! The SFT phase: cross-entropy on gold responses so the model has support before RL (the
//! boundary-aware recipe: SFT expands support, RL sharpens it).

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use medrl_learner::batch::{Completion, Group};
use medrl_learner::config::{AlgorithmConfig, AlgorithmName, LearnerConfig};
use medrl_learner::trainer::Trainer;
use medrl_vqa::{PromptTemplate, VqaRecord};
use serde::{Deserialize, Serialize};

use super::data::Split;

/// The `sft` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SftSection {
    /// Optimizer steps; 0 skips the phase.
    pub steps: u64,
    /// Records per step.
    pub prompts_per_step: usize,
    /// AdamW learning rate (constant).
    pub lr: f64,
}

impl Default for SftSection {
    fn default() -> Self {
        SftSection { steps: 0, prompts_per_step: 8, lr: 1e-5 }
    }
}

/// The gold response the SFT phase teaches: a short thought, then the option letter, then EOS.
pub fn gold_response(record: &VqaRecord) -> String {
    let answer = record.answer_label.as_deref().unwrap_or(&record.answer);
    format!("<think>The picture shows {}.</think><answer>{answer}</answer><|im_end|>", record.answer)
}

/// What the phase did.
pub struct SftOutcome {
    pub first_loss: f64,
    pub last_loss: f64,
    pub seconds: f64,
}

/// Fine-tunes `base` on `data` and writes the result to `out` (HF layout).
#[allow(clippy::too_many_arguments)]
pub fn run_sft(
    base: &Path,
    out: &Path,
    data: &Split,
    sft: &SftSection,
    template: PromptTemplate,
    system: Option<&str>,
    learner: &LearnerConfig,
    dtype: DType,
    device: &Device,
    on_step: &mut dyn FnMut(u64, f64),
) -> Result<SftOutcome> {
    let start = std::time::Instant::now();
    let algorithm = AlgorithmConfig { name: AlgorithmName::Sft, template, system_prompt: system.map(String::from), ..AlgorithmConfig::default() };
    let mut config = LearnerConfig { total_steps: sft.steps.max(1), ..learner.clone() };
    config.optimizer.lr = sft.lr;
    config.schedule = medrl_learner::schedule::ScheduleConfig { kind: medrl_learner::schedule::ScheduleKind::Constant, ..Default::default() };
    let mut trainer = Trainer::new(base, algorithm, config, dtype, device).context("loading the model for SFT")?;
    let base_dir = data.base();
    let mut groups = Vec::with_capacity(data.records.len());
    for r in &data.records {
        let prompt = template.build(&r.question, &r.options);
        let images = trainer.vlm.load_images(&r.image_paths(&base_dir))?;
        let encoded = trainer.vlm.user_prompt(prompt.system.as_deref().or(system), images, &prompt.user)?;
        let ids = trainer.vlm.prompts.encode_completion(&gold_response(r))?;
        let text = trainer.vlm.prompts.decode(&ids, true)?;
        let completions = vec![Completion { ids, text, sampling_logprobs: None }];
        groups.push(Group { prompt: encoded, answer: r.answer.clone(), answer_label: r.answer_label.clone(), options: r.options.clone(), completions, version: 0 });
    }
    anyhow::ensure!(!groups.is_empty(), "the SFT data has no records");
    let (mut first, mut last) = (f64::NAN, f64::NAN);
    let per_step = sft.prompts_per_step.max(1);
    for step in 0..sft.steps {
        let batch: Vec<Group> = (0..per_step).map(|i| groups[(step as usize * per_step + i) % groups.len()].clone()).collect();
        let report = trainer.step(&batch)?;
        if step == 0 {
            first = report.loss;
        }
        last = report.loss;
        on_step(step, report.loss);
    }
    trainer.save_model(out).with_context(|| format!("writing the SFT model to {}", out.display()))?;
    Ok(SftOutcome { first_loss: first, last_loss: last, seconds: start.elapsed().as_secs_f64() })
}
