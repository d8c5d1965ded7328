//! One optimizer step of GRPO, GRPO-CARE or SFT on the policy model, as the released code does it:
//! rule rewards, the consistency bonus from an EMA reference model, group advantages, the
//! per-token loss over micro-batches (with per-layer recomputation), clipping, the optimizer
//! step, the schedule and the reference EMA.

use std::ops::Range;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use medrl_model::image::ProcessedImage;
use medrl_model::model::{Qwen25Vl, Sequence};
use medrl_model::nn::Exec;
use medrl_model::pipeline::Vlm;
use medrl_model::weights::Weights;
use medrl_vqa::{Gold, compute_advantages};
use serde::Serialize;

use crate::batch::Group;
use crate::care::{answer_confidence, care_bonus, ema_blend, released_answer_span};
use crate::config::{AlgorithmConfig, AlgorithmName, LearnerConfig, OptimizerKind};
use crate::loss::{Aggregation, PolicyLossInputs, policy_loss};
use crate::mask::counted_len;
use crate::optim::{AdamW, GradAccumulator, Optimizer, Sgd, clip_grad_norm};
use crate::policy::Policy;
use crate::schedule::LrSchedule;
use crate::{Error, Result};

/// What one step did; the first fields are what `medrl learner step` prints.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StepReport {
    pub loss: f64,
    pub grad_norm: f64,
    /// Total reward per completion, per group.
    pub rewards: Vec<Vec<f64>>,
    pub advantages: Vec<Vec<f64>>,
    pub bonus: Vec<Vec<f64>>,
    /// Completion tokens in the loss.
    pub tokens: usize,
    /// Optimizer steps taken after this one.
    pub step: u64,
    /// Learning rate this step used.
    pub lr: f64,
    pub mean_reward: f64,
    pub mean_accuracy: f64,
    pub mean_format: f64,
    pub groups_kept: usize,
}

/// A sequence of the step: prompt + completion, the completion tokens that count, and its weight.
struct Item<'a> {
    ids: Vec<u32>,
    images: &'a [ProcessedImage],
    span: Range<usize>,
    advantage: f64,
    old: Option<Vec<f32>>,
}

/// The optimizer in use; AdamW's state is saved with checkpoints.
pub enum Opt {
    AdamW(AdamW),
    Sgd(Sgd),
}

impl Opt {
    fn as_dyn(&mut self) -> &mut dyn Optimizer {
        match self {
            Opt::AdamW(o) => o,
            Opt::Sgd(o) => o,
        }
    }
}

/// The learner's model, optimizer, schedule and reference, stepping on groups.
pub struct Trainer {
    /// The policy model with its processor and tokenizer.
    pub vlm: Vlm,
    pub policy: Policy,
    /// The EMA reference's weights and model, when the algorithm needs one.
    pub reference: Option<(Weights, Qwen25Vl)>,
    pub optimizer: Opt,
    schedule: LrSchedule,
    pub algorithm: AlgorithmConfig,
    pub config: LearnerConfig,
    /// Optimizer steps taken.
    pub step: u64,
    eos_ids: Vec<u32>,
    dtype: DType,
}

impl Trainer {
    /// Loads the model of `dir` for training.
    pub fn new(dir: &Path, algorithm: AlgorithmConfig, config: LearnerConfig, dtype: DType, device: &Device) -> Result<Self> {
        config.validate()?;
        let (model, policy) = Policy::load(dir, &config, dtype, device)?;
        Self::assemble(dir, model, policy, algorithm, config, None, None)
    }

    /// Puts the parts together; `reference` and `optimizer` restore saved state.
    pub fn assemble(
        dir: &Path,
        model: Qwen25Vl,
        policy: Policy,
        algorithm: AlgorithmConfig,
        config: LearnerConfig,
        reference: Option<Weights>,
        optimizer: Option<Opt>,
    ) -> Result<Self> {
        let dtype = model.dtype();
        let device = model.device().clone();
        let needs_reference = algorithm.name == AlgorithmName::GrpoCare || algorithm.loss.beta > 0.0;
        let reference = if needs_reference {
            let w = match reference {
                Some(w) => w,
                None => policy.merged_weights()?,
            };
            let m = Qwen25Vl::new(model.config.clone(), &w, dtype, &device)?;
            Some((w, m))
        } else {
            None
        };
        let optimizer = match optimizer {
            Some(o) => o,
            None => match config.optimizer.kind {
                OptimizerKind::Adamw => Opt::AdamW(AdamW::placed(policy.params.clone(), config.optimizer.adamw(), config.optimizer.placement())?),
                OptimizerKind::Sgd => Opt::Sgd(Sgd::new(policy.vars(), config.optimizer.lr)),
            },
        };
        let schedule = LrSchedule::new(&config.schedule, config.optimizer.lr, config.total_steps)?;
        let vlm = Vlm::from_parts(dir, model)?;
        // The released mask ends at the tokenizer's EOS, <|im_end|> for Qwen2.5-VL.
        let eos_ids = vlm.prompts.token_id("<|im_end|>").map(|id| vec![id]).unwrap_or_else(|| vlm.stop_ids.clone());
        Ok(Trainer { vlm, policy, reference, optimizer, schedule, algorithm, config, step: 0, eos_ids, dtype })
    }

    /// Token ids that end a completion for the loss mask.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// One RL step (GRPO or GRPO-CARE) on prompt groups.
    pub fn rl_step(&mut self, groups: &[Group]) -> Result<StepReport> {
        if groups.is_empty() {
            return Err(Error::EmptyBatch("no groups for the step".into()));
        }
        let mut report = StepReport::default();
        let mut accuracy: Vec<Vec<f64>> = Vec::new();
        let (mut acc_sum, mut fmt_sum, mut n) = (0.0, 0.0, 0usize);
        for g in groups {
            let gold = Gold { answer: &g.answer, label: g.answer_label.as_deref(), options: &g.options };
            let outcomes: Vec<_> = g.completions.iter().map(|c| self.algorithm.rewards.score(&c.text, &gold)).collect();
            accuracy.push(outcomes.iter().map(|o| o.components.accuracy).collect());
            for o in &outcomes {
                acc_sum += o.components.accuracy;
                fmt_sum += o.components.format;
                n += 1;
            }
            report.rewards.push(outcomes.iter().map(|o| o.total).collect());
        }
        if self.algorithm.name == AlgorithmName::GrpoCare {
            for (gi, g) in groups.iter().enumerate() {
                let confidence = self.reference_confidences(g)?;
                let care = care_bonus(&self.algorithm.care, &accuracy[gi], &confidence)?;
                for (r, b) in report.rewards[gi].iter_mut().zip(&care.bonus) {
                    *r += b;
                }
                report.bonus.push(care.bonus);
            }
        } else {
            report.bonus = groups.iter().map(|g| vec![0.0; g.completions.len()]).collect();
        }
        let adv = compute_advantages(&report.rewards, &self.algorithm.advantage).map_err(|e| Error::Input(e.to_string()))?;
        report.groups_kept = adv.kept.len();
        report.mean_accuracy = acc_sum / n.max(1) as f64;
        report.mean_format = fmt_sum / n.max(1) as f64;
        report.mean_reward = report.rewards.iter().flatten().sum::<f64>() / n.max(1) as f64;

        let mut items = Vec::new();
        for &gi in &adv.kept {
            let g = &groups[gi];
            for (ci, c) in g.completions.iter().enumerate() {
                items.push(self.item(g, c, adv.advantages[gi][ci])?);
            }
        }
        let taken = if items.is_empty() {
            // Every group was dropped (all rewards equal): nothing to learn, but the step counts.
            (0.0, 0, 0.0)
        } else {
            self.policy_gradient_step(&items, true)?
        };
        report.advantages = adv.advantages;
        self.finish_step(report, taken)
    }

    /// One SFT step: cross-entropy (mean over all response tokens) on each completion as the gold
    /// response to its prompt.
    pub fn sft_step(&mut self, groups: &[Group]) -> Result<StepReport> {
        let mut items = Vec::new();
        for g in groups {
            for c in &g.completions {
                items.push(self.item(g, c, 1.0)?);
            }
        }
        if items.is_empty() {
            return Err(Error::EmptyBatch("no responses for the SFT step".into()));
        }
        let taken = self.policy_gradient_step(&items, false)?;
        self.finish_step(StepReport::default(), taken)
    }

    /// The step the algorithm calls for.
    pub fn step(&mut self, groups: &[Group]) -> Result<StepReport> {
        match self.algorithm.name {
            AlgorithmName::Sft => self.sft_step(groups),
            AlgorithmName::Grpo | AlgorithmName::GrpoCare => self.rl_step(groups),
        }
    }

    fn item<'a>(&self, g: &'a Group, c: &crate::batch::Completion, advantage: f64) -> Result<Item<'a>> {
        // Tokens after the first EOS are masked and cannot affect earlier ones: drop them.
        let len = counted_len(&c.ids, &self.eos_ids);
        let mut ids = g.prompt.ids.clone();
        ids.extend_from_slice(&c.ids[..len]);
        let start = g.prompt.ids.len();
        Ok(Item { span: start..start + len, ids, images: &g.prompt.images, advantage, old: c.sampling_logprobs.as_ref().map(|l| l[..len].to_vec()) })
    }

    /// Reference confidence over each completion's answer span (GRPO-CARE).
    fn reference_confidences(&self, g: &Group) -> Result<Vec<f64>> {
        let Some((_, reference)) = &self.reference else {
            return Err(Error::config("algorithm.name", "grpo_care needs a reference model"));
        };
        let tokenizer = self.vlm.prompts.tokenizer();
        let token = |id: u32| tokenizer.id_to_token(id).unwrap_or_default();
        let prompt_last = g.prompt.ids.last().map(|&id| token(id));
        let mut out = Vec::with_capacity(g.completions.len());
        for chunk in g.completions.chunks(self.config.micro_batch_sequences.max(1)) {
            let seqs: Vec<Vec<u32>> = chunk.iter().map(|c| [g.prompt.ids.as_slice(), c.ids.as_slice()].concat()).collect();
            let spans: Vec<Range<usize>> = chunk.iter().map(|c| g.prompt.ids.len()..g.prompt.ids.len() + c.ids.len()).collect();
            let batch = reference.batch(&seqs.iter().map(|ids| Sequence { ids, images: &g.prompt.images }).collect::<Vec<_>>(), self.vlm.pad_id)?;
            let lps = reference.span_logprobs(&batch, &spans, Exec::Infer)?.to_vec1::<f32>()?;
            let mut at = 0;
            for c in chunk {
                let lp = &lps[at..at + c.ids.len()];
                at += c.ids.len();
                let strings: Vec<String> = c.ids.iter().map(|&id| token(id)).collect();
                let eos = c.ids.iter().position(|id| self.eos_ids.contains(id));
                let span = released_answer_span(&strings, prompt_last.as_deref(), eos);
                out.push(answer_confidence(lp, span)?);
            }
        }
        Ok(out)
    }

    /// Forward and backward over micro-batches, then clip and step. Returns the loss value, the
    /// number of tokens and the pre-clip gradient norm.
    fn policy_gradient_step(&mut self, items: &[Item<'_>], rl: bool) -> Result<(f64, usize, f64)> {
        let tokens: usize = items.iter().map(|i| i.span.len()).sum();
        let nonempty = items.iter().filter(|i| !i.span.is_empty()).count();
        if tokens == 0 {
            return Err(Error::EmptyBatch("the step's completions have no tokens".into()));
        }
        let aggregation = self.algorithm.loss.aggregation;
        let denominator = if !rl {
            tokens as f64
        } else {
            match aggregation {
                Aggregation::SeqMeanTokenMean => nonempty as f64,
                Aggregation::TokenMean => tokens as f64,
                Aggregation::SeqMeanTokenSumNorm => items.len() as f64,
            }
        };
        let vars = self.policy.vars();
        let mut acc = GradAccumulator::new(vars.clone(), self.config.optimizer.placement());
        let mut loss_total = 0.0;
        let model = &self.vlm.model;
        let device = model.device().clone();
        let pad_id = self.vlm.pad_id;
        for chunk in items.chunks(self.config.micro_batch_sequences.max(1)) {
            let chunk: Vec<&Item<'_>> = chunk.iter().filter(|i| !i.span.is_empty()).collect();
            if chunk.is_empty() {
                continue;
            }
            let seqs: Vec<Sequence<'_>> = chunk.iter().map(|i| Sequence { ids: &i.ids, images: i.images }).collect();
            let batch = model.batch(&seqs, pad_id)?;
            let spans: Vec<Range<usize>> = chunk.iter().map(|i| i.span.clone()).collect();
            let lens: Vec<usize> = spans.iter().map(|s| s.len()).collect();
            let width = lens.iter().copied().max().unwrap_or(0);
            let mask = crate::loss::mask_from_lengths(&lens, width, &device)?;
            let ref_lp = match (&self.reference, rl && self.algorithm.loss.beta > 0.0) {
                (Some((_, reference)), true) => {
                    let rb = reference.batch(&seqs, pad_id)?;
                    Some(pad_rows(&reference.span_logprobs(&rb, &spans, Exec::Infer)?, &lens, width)?)
                }
                _ => None,
            };
            let old = if rl && chunk.iter().any(|i| i.old.is_some()) {
                let flat: Vec<f32> = chunk.iter().flat_map(|i| i.old.clone().unwrap_or_else(|| vec![f32::NAN; i.span.len()])).collect();
                if flat.iter().any(|x| x.is_nan()) {
                    return Err(Error::Input("a step mixes groups with and without sampling log-probs".into()));
                }
                Some(pad_rows(&Tensor::from_vec(flat, tokens_of(&lens), &device)?, &lens, width)?)
            } else {
                None
            };
            let advantages = Tensor::from_vec(chunk.iter().map(|i| i.advantage as f32).collect::<Vec<_>>(), chunk.len(), &device)?;
            let loss_cfg = &self.algorithm.loss;
            let mut loss_of = |lp: &Tensor| -> medrl_model::Result<Tensor> {
                let lp = pad_rows(lp, &lens, width).map_err(to_model)?;
                if !rl {
                    return Ok(((lp * &mask)?.sum_all()? * (-1.0 / denominator))?);
                }
                let inputs = PolicyLossInputs {
                    logprobs: &lp,
                    old_logprobs: old.as_ref(),
                    advantages: &advantages,
                    mask: &mask,
                    ref_logprobs: ref_lp.as_ref(),
                    denominator: Some(denominator),
                };
                Ok(policy_loss(loss_cfg, &inputs).map_err(to_model)?.loss)
            };
            let (loss, grads): (f64, GradStore) = if self.config.gradient_checkpointing {
                let (_, loss, grads) = model.checkpointed_backward(&batch, &spans, &mut loss_of)?;
                (loss, grads)
            } else {
                let lp = model.span_logprobs(&batch, &spans, Exec::Train)?;
                let loss = loss_of(&lp)?;
                (loss.to_dtype(DType::F64)?.to_scalar::<f64>()?, loss.backward()?)
            };
            loss_total += loss;
            acc.add(&grads)?;
        }
        let mut grads = acc.take(1.0)?;
        let grad_norm = clip_grad_norm(&mut grads, &vars, self.config.max_grad_norm)?;
        let lr = self.schedule.lr(self.step);
        let opt = self.optimizer.as_dyn();
        opt.set_learning_rate(lr);
        opt.step(&grads)?;
        Ok((loss_total, tokens, grad_norm))
    }

    /// Fills in what `policy_gradient_step` returned (loss, tokens, pre-clip gradient norm) and
    /// the schedule, counts the step and updates the reference when due.
    fn finish_step(&mut self, mut report: StepReport, (loss, tokens, grad_norm): (f64, usize, f64)) -> Result<StepReport> {
        report.loss = loss;
        report.tokens = tokens;
        report.grad_norm = grad_norm;
        report.lr = self.schedule.lr(self.step);
        self.step += 1;
        report.step = self.step;
        if self.algorithm.ema.is_due(self.step) {
            self.update_reference()?;
        }
        Ok(report)
    }

    /// `ref <- decay · ref + (1 - decay) · policy`, then rebuilds the reference model.
    fn update_reference(&mut self) -> Result<()> {
        let Some((weights, _)) = &self.reference else { return Ok(()) };
        let current = self.policy.merged_weights()?;
        let mut blended = Weights::default();
        for (name, r) in weights.iter() {
            blended.insert(name.clone(), ema_blend(r, current.get(name)?, self.algorithm.ema.decay)?);
        }
        let model = Qwen25Vl::new(self.vlm.model.config.clone(), &blended, self.dtype, self.vlm.model.device())?;
        self.reference = Some((blended, model));
        Ok(())
    }
}

fn to_model(e: Error) -> medrl_model::Error {
    match e {
        Error::Model(m) => m,
        Error::Candle(c) => medrl_model::Error::Candle(c),
        other => medrl_model::Error::Input(other.to_string()),
    }
}

fn tokens_of(lens: &[usize]) -> usize {
    lens.iter().sum()
}

/// Lays out a flat `[sum(lens)]` tensor as `[rows, width]`, zero-padded on the right (differentiable).
fn pad_rows(flat: &Tensor, lens: &[usize], width: usize) -> Result<Tensor> {
    let mut rows = Vec::with_capacity(lens.len());
    let mut at = 0;
    for &len in lens {
        let row = flat.narrow(0, at, len)?;
        at += len;
        let row = if len < width { Tensor::cat(&[&row, &Tensor::zeros(width - len, row.dtype(), row.device())?], 0)? } else { row };
        rows.push(row);
    }
    Ok(Tensor::stack(&rows, 0)?)
}
