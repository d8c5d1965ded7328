//! The clipped policy-gradient loss of GRPO / GRPO-CARE / DAPO / Dr. GRPO on per-token tensors,
//! with an optional KL penalty to a reference model.
//!
//! Per token: `r = exp(lp − old)`, `pg = −min(r·A, clip(r, 1 − clip_low, 1 + clip_high)·A)`, plus
//! `beta · kl` when a reference is given. The released GRPO-CARE code computes
//! `−exp(lp − lp.detach())·A` (one update per rollout batch, no clipping): with `old` equal to the
//! detached current log-probs (`old_logprobs: None`) the ratio is exactly 1, clipping never
//! triggers and the gradient is `−A·∇lp`, which is that formula.

pub mod aggregate;
pub mod kl;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

pub use aggregate::{Aggregation, TokenWeights, aggregate_value, mask_from_lengths};
pub use kl::{KlEstimator, per_token_kl};

use crate::{Error, Result};

/// Settings of the policy loss (`algorithm.loss` in a run config); defaults are the released run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyLossConfig {
    /// Lower clip range: the ratio is clipped below at `1 − clip_low`.
    pub clip_low: f64,
    /// Upper clip range: the ratio is clipped above at `1 + clip_high` (DAPO's clip-higher
    /// raises this one alone).
    pub clip_high: f64,
    /// How per-token losses become one number.
    pub aggregation: Aggregation,
    /// Dr. GRPO's constant divisor (the run's maximum completion length; 2048 in the released
    /// run). Used only by `seq-mean-token-sum-norm`.
    pub max_completion_length: usize,
    /// KL coefficient; 0 (the released run) leaves the KL out of the loss.
    pub beta: f64,
    /// KL estimator used for the penalty and the `mean_kl` metric.
    pub kl_estimator: KlEstimator,
    /// Clamp of the log-ratio before the KL estimator; `10` as in the released trainer.
    pub kl_log_ratio_clamp: Option<f64>,
}

impl Default for PolicyLossConfig {
    fn default() -> Self {
        Self {
            clip_low: 0.2,
            clip_high: 0.2,
            aggregation: Aggregation::SeqMeanTokenMean,
            max_completion_length: 2048,
            beta: 0.0,
            kl_estimator: KlEstimator::K3,
            kl_log_ratio_clamp: Some(10.0),
        }
    }
}

impl PolicyLossConfig {
    /// Checks every setting's range.
    pub fn validate(&self) -> Result<()> {
        if !(self.clip_low.is_finite() && (0.0..=1.0).contains(&self.clip_low)) {
            return Err(Error::config(
                "clip_low",
                format!("must be in [0, 1], got {}", self.clip_low),
            ));
        }
        if !(self.clip_high.is_finite() && self.clip_high >= 0.0) {
            return Err(Error::config(
                "clip_high",
                format!("must be finite and >= 0, got {}", self.clip_high),
            ));
        }
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            return Err(Error::config(
                "beta",
                format!("must be finite and >= 0, got {}", self.beta),
            ));
        }
        if self.max_completion_length == 0 {
            return Err(Error::config("max_completion_length", "must be > 0"));
        }
        if let Some(c) = self.kl_log_ratio_clamp
            && !(c.is_finite() && c > 0.0)
        {
            return Err(Error::config(
                "kl_log_ratio_clamp",
                format!("must be finite and > 0, got {c}"),
            ));
        }
        Ok(())
    }
}

/// The tensors of one (micro-)batch of completions.
#[derive(Debug, Clone, Copy)]
pub struct PolicyLossInputs<'a> {
    /// Current policy log-probs of the sampled tokens `[B, T]`, differentiable.
    pub logprobs: &'a Tensor,
    /// Log-probs under the policy that sampled them `[B, T]`; `None` = the detached current
    /// log-probs (one update per rollout batch, as released).
    pub old_logprobs: Option<&'a Tensor>,
    /// One advantage per completion `[B]`.
    pub advantages: &'a Tensor,
    /// 1 for completion tokens that count (through the first EOS), 0 for padding `[B, T]`.
    pub mask: &'a Tensor,
    /// Reference-model log-probs `[B, T]`; needed when `beta > 0`, else only for `mean_kl`.
    pub ref_logprobs: Option<&'a Tensor>,
    /// The optimizer batch's denominator when this call sees one micro-batch of it (see
    /// [`TokenWeights::new`]); `None` = this batch's own.
    pub denominator: Option<f64>,
}

/// Host-side numbers for logging; token fractions are over completion tokens of this call.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct LossMetrics {
    /// Value of the returned loss.
    pub loss: f64,
    /// The aggregated policy-gradient part.
    pub policy_loss: f64,
    /// The aggregated KL before `beta` (0 without a reference).
    pub kl_term: f64,
    /// Token mean of the importance ratio.
    pub mean_ratio: f64,
    /// Fraction of tokens clipped at `1 − clip_low` (ratio below it and negative advantage).
    pub clip_frac_low: f64,
    /// Fraction of tokens clipped at `1 + clip_high` (ratio above it and positive advantage).
    pub clip_frac_high: f64,
    /// KL as the released trainer logs it (mean over tokens per sequence, then over
    /// sequences); `None` without a reference.
    pub mean_kl: Option<f64>,
    /// Completion tokens in this call (sum of the mask).
    pub tokens: f64,
    /// Sequences with at least one completion token.
    pub sequences: usize,
}

/// The loss scalar (differentiable in `logprobs`) and its metrics.
#[derive(Debug, Clone)]
pub struct PolicyLoss {
    /// Scalar f32 loss to call `backward` on.
    pub loss: Tensor,
    /// Numbers for logging.
    pub metrics: LossMetrics,
}

fn same_shape(name: &'static str, t: &Tensor, b: usize, len: usize) -> Result<()> {
    if t.dims() == [b, len] {
        Ok(())
    } else {
        Err(Error::shape(
            name,
            format!("[{b}, {len}] like logprobs"),
            t.dims(),
        ))
    }
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(f64::from(t.to_dtype(DType::F32)?.to_scalar::<f32>()?))
}

/// The clipped policy loss with optional KL penalty, aggregated as configured.
pub fn policy_loss(cfg: &PolicyLossConfig, inputs: &PolicyLossInputs<'_>) -> Result<PolicyLoss> {
    cfg.validate()?;
    let (b, len) = inputs
        .logprobs
        .dims2()
        .map_err(|_| Error::shape("logprobs", "[B, T]", inputs.logprobs.dims()))?;
    same_shape("mask", inputs.mask, b, len)?;
    if let Some(old) = inputs.old_logprobs {
        same_shape("old_logprobs", old, b, len)?;
    }
    if let Some(rf) = inputs.ref_logprobs {
        same_shape("ref_logprobs", rf, b, len)?;
    }
    if inputs.advantages.dims() != [b] {
        return Err(Error::shape(
            "advantages",
            format!("[{b}]"),
            inputs.advantages.dims(),
        ));
    }
    let adv_host = inputs.advantages.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    if let Some((i, a)) = adv_host.iter().enumerate().find(|(_, a)| !a.is_finite()) {
        return Err(Error::NonFinite {
            what: format!("advantage {i}"),
            value: *a,
        });
    }
    if cfg.beta > 0.0 && inputs.ref_logprobs.is_none() {
        return Err(Error::config("beta", "beta > 0 needs reference log-probs"));
    }

    let dev = inputs.logprobs.device();
    let mask = inputs.mask.to_dtype(DType::F32)?;
    // Padding positions may hold anything (−inf, NaN, stale values). Replacing them by 0 before
    // any arithmetic keeps both the loss and the gradient finite; `where_cond` sends exactly 0
    // gradient to the replaced positions.
    let keep = mask.ne(0f32)?;
    let zeros = Tensor::zeros((b, len), DType::F32, dev)?;
    let lp = keep.where_cond(&inputs.logprobs.to_dtype(DType::F32)?, &zeros)?;
    let old = match inputs.old_logprobs {
        Some(o) => keep.where_cond(&o.detach().to_dtype(DType::F32)?, &zeros)?,
        None => lp.detach(),
    };
    let adv = Tensor::from_vec(
        adv_host.iter().map(|&a| a as f32).collect::<Vec<_>>(),
        (b, 1),
        dev,
    )?;

    let ratio = (&lp - &old)?.exp()?;
    let unclipped = ratio.broadcast_mul(&adv)?;
    let ratio_d = ratio.detach();
    let (lo, hi) = (1.0 - cfg.clip_low, 1.0 + cfg.clip_high);
    let clipped = ratio_d.clamp(lo, hi)?.broadcast_mul(&adv)?;
    // min(r·A, clip(r)·A): the clipped branch wins only when strictly smaller, and then r is
    // outside the clip range, so its value is constant and the token gets no gradient (as
    // torch's clamp/min would give). Ties keep the unclipped, differentiable branch.
    let take_clipped = clipped.lt(&unclipped.detach())?;
    let pg_tok = take_clipped.where_cond(&clipped, &unclipped)?.neg()?;

    let weights = TokenWeights::new(
        cfg.aggregation,
        &mask,
        cfg.max_completion_length,
        inputs.denominator,
    )?;
    let pg = weights.apply(&pg_tok)?;

    let (loss, kl_term, mean_kl) = match inputs.ref_logprobs {
        Some(rf) => {
            let rf = keep.where_cond(&rf.detach().to_dtype(DType::F32)?, &zeros)?;
            // With beta = 0 the KL is a metric only and must not build graph.
            let source = if cfg.beta > 0.0 {
                lp.clone()
            } else {
                lp.detach()
            };
            let kl_tok = per_token_kl(cfg.kl_estimator, &source, &rf, cfg.kl_log_ratio_clamp)?;
            let kl = weights.apply(&kl_tok)?;
            let mean_kl = if weights.nonempty_sequences > 0 {
                Some(aggregate_value(
                    Aggregation::SeqMeanTokenMean,
                    &kl_tok,
                    &mask,
                    1,
                )?)
            } else {
                None
            };
            let loss = if cfg.beta > 0.0 {
                (&pg + (&kl * cfg.beta)?)?
            } else {
                pg.clone()
            };
            (loss, scalar(&kl)?, mean_kl)
        }
        None => (pg.clone(), 0.0, None),
    };

    let tokens = weights.tokens;
    let token_mean = |x: &Tensor| -> Result<f64> {
        if tokens > 0.0 {
            Ok(scalar(&x.to_dtype(DType::F32)?.mul(&mask)?.sum_all()?)? / tokens)
        } else {
            Ok(0.0)
        }
    };
    let neg_adv = adv.lt(0f32)?.to_dtype(DType::F32)?;
    let pos_adv = adv.gt(0f32)?.to_dtype(DType::F32)?;
    let low = ratio_d
        .lt(lo)?
        .to_dtype(DType::F32)?
        .broadcast_mul(&neg_adv)?;
    let high = ratio_d
        .gt(hi)?
        .to_dtype(DType::F32)?
        .broadcast_mul(&pos_adv)?;
    let metrics = LossMetrics {
        loss: scalar(&loss)?,
        policy_loss: scalar(&pg)?,
        kl_term,
        mean_ratio: token_mean(&ratio_d)?,
        clip_frac_low: token_mean(&low)?,
        clip_frac_high: token_mean(&high)?,
        mean_kl,
        tokens,
        sequences: weights.nonempty_sequences,
    };
    Ok(PolicyLoss { loss, metrics })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6
    }

    fn grad(loss: &Tensor, v: &Var) -> Result<Vec<Vec<f32>>> {
        let g = loss.backward()?;
        Ok(g.get(v.as_tensor())
            .expect("logprobs gradient")
            .to_vec2::<f32>()?)
    }

    fn assert_rows(actual: &[Vec<f32>], expected: &[&[f64]]) {
        for (ra, re) in actual.iter().zip(expected) {
            for (a, e) in ra.iter().zip(re.iter()) {
                assert!(close(f64::from(*a), *e), "{actual:?} != {expected:?}");
            }
        }
    }

    fn inputs<'a>(lp: &'a Tensor, adv: &'a Tensor, mask: &'a Tensor) -> PolicyLossInputs<'a> {
        PolicyLossInputs {
            logprobs: lp,
            old_logprobs: None,
            advantages: adv,
            mask,
            ref_logprobs: None,
            denominator: None,
        }
    }

    /// Two completions of 2 and 3 tokens in width 4; advantages 1 and −2; on-policy.
    fn on_policy(mode: Aggregation) -> Result<(LossMetrics, Vec<Vec<f32>>)> {
        let dev = Device::Cpu;
        let lp = Var::new(
            &[[-0.5f32, -1.0, -7.0, -7.0], [-0.2, -0.3, -0.4, -7.0]],
            &dev,
        )?;
        let adv = Tensor::new(&[1f32, -2.0], &dev)?;
        let mask = mask_from_lengths(&[2, 3], 4, &dev)?;
        let cfg = PolicyLossConfig {
            aggregation: mode,
            max_completion_length: 4,
            ..Default::default()
        };
        let out = policy_loss(&cfg, &inputs(lp.as_tensor(), &adv, &mask))?;
        let g = grad(&out.loss, &lp)?;
        Ok((out.metrics, g))
    }

    #[test]
    fn on_policy_seq_mean_token_mean_is_the_released_formula() -> Result<()> {
        // Ratio ≡ 1: per-token loss −A. Row means −1 and 2, mean 0.5.
        // Gradient −A_b / (len_b · B): −1/4 on row 0, 2/6 on row 1, 0 on padding.
        let (m, g) = on_policy(Aggregation::SeqMeanTokenMean)?;
        assert!(close(m.loss, 0.5), "{m:?}");
        assert!(close(m.mean_ratio, 1.0) && m.clip_frac_low == 0.0 && m.clip_frac_high == 0.0);
        assert_rows(
            &g,
            &[
                &[-0.25, -0.25, 0.0, 0.0],
                &[1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 0.0],
            ],
        );
        Ok(())
    }

    #[test]
    fn on_policy_token_mean() -> Result<()> {
        // (−1·2 + 2·3) / 5 = 0.8; gradient −A_b / 5.
        let (m, g) = on_policy(Aggregation::TokenMean)?;
        assert!(close(m.loss, 0.8), "{m:?}");
        assert_rows(&g, &[&[-0.2, -0.2, 0.0, 0.0], &[0.4, 0.4, 0.4, 0.0]]);
        Ok(())
    }

    #[test]
    fn on_policy_seq_mean_token_sum_norm() -> Result<()> {
        // Row sums −2 and 6, each / 4, mean over 2: (−0.5 + 1.5) / 2 = 0.5; gradient −A_b / 8.
        let (m, g) = on_policy(Aggregation::SeqMeanTokenSumNorm)?;
        assert!(close(m.loss, 0.5), "{m:?}");
        assert_rows(&g, &[&[-0.125, -0.125, 0.0, 0.0], &[0.25, 0.25, 0.25, 0.0]]);
        Ok(())
    }

    #[test]
    fn off_policy_ratio_inside_the_clip_range_by_hand() -> Result<()> {
        // Ratios e^{0.1} and e^{−0.1} (inside [0.8, 1.2]); one completion, two tokens, A = 2.
        let dev = Device::Cpu;
        let lp = Var::new(&[[-1.0f32, -2.0]], &dev)?;
        let old = Tensor::new(&[[-1.1f32, -1.9]], &dev)?;
        let adv = Tensor::new(&[2f32], &dev)?;
        let mask = mask_from_lengths(&[2], 2, &dev)?;
        let mut inp = inputs(lp.as_tensor(), &adv, &mask);
        inp.old_logprobs = Some(&old);
        let out = policy_loss(&PolicyLossConfig::default(), &inp)?;
        let (r1, r2) = (0.1f64.exp(), (-0.1f64).exp());
        assert!(close(out.metrics.loss, -(r1 + r2)), "{:?}", out.metrics);
        assert!(close(out.metrics.mean_ratio, (r1 + r2) / 2.0));
        // d/dlp of −r·A/2 = −r·A/2 = −r.
        assert_rows(&grad(&out.loss, &lp)?, &[&[-r1, -r2]]);
        Ok(())
    }

    #[test]
    fn clipping_above_and_below_with_both_advantage_signs() -> Result<()> {
        // Four one-token completions: ratio 1.5 or 0.5, advantage +1 or −1, token-mean.
        let dev = Device::Cpu;
        let (up, down) = (1.5f32.ln(), 0.5f32.ln());
        let lp = Var::new(&[[up], [up], [down], [down]], &dev)?;
        let old = Tensor::zeros((4, 1), DType::F32, &dev)?;
        let adv = Tensor::new(&[1f32, -1.0, 1.0, -1.0], &dev)?;
        let mask = mask_from_lengths(&[1, 1, 1, 1], 1, &dev)?;
        let mut inp = inputs(lp.as_tensor(), &adv, &mask);
        inp.old_logprobs = Some(&old);
        let cfg = PolicyLossConfig {
            aggregation: Aggregation::TokenMean,
            ..Default::default()
        };
        let out = policy_loss(&cfg, &inp)?;
        // Per token (−min): r=1.5,A=+1 → −1.2 (clipped); r=1.5,A=−1 → 1.5 (unclipped);
        // r=0.5,A=+1 → −0.5 (unclipped); r=0.5,A=−1 → 0.8 (clipped). Mean = 0.15.
        assert!(close(out.metrics.loss, 0.15), "{:?}", out.metrics);
        assert!(close(out.metrics.clip_frac_high, 0.25) && close(out.metrics.clip_frac_low, 0.25));
        // Gradient −A·r/4 where unclipped, 0 where clipped.
        assert_rows(
            &grad(&out.loss, &lp)?,
            &[&[0.0], &[1.5 / 4.0], &[-0.5 / 4.0], &[0.0]],
        );
        Ok(())
    }

    #[test]
    fn clip_higher_uses_its_own_upper_bound() -> Result<()> {
        // Ratio 1.25 with A = 1: clipped at 1.2 under 0.2/0.2, not under 0.2/0.28.
        let dev = Device::Cpu;
        let lp = Var::new(&[[1.25f32.ln()]], &dev)?;
        let old = Tensor::zeros((1, 1), DType::F32, &dev)?;
        let adv = Tensor::new(&[1f32], &dev)?;
        let mask = mask_from_lengths(&[1], 1, &dev)?;
        let mut inp = inputs(lp.as_tensor(), &adv, &mask);
        inp.old_logprobs = Some(&old);
        let sym = policy_loss(&PolicyLossConfig::default(), &inp)?;
        assert!(close(sym.metrics.loss, -1.2) && close(sym.metrics.clip_frac_high, 1.0));
        let cfg = PolicyLossConfig {
            clip_high: 0.28,
            ..Default::default()
        };
        let higher = policy_loss(&cfg, &inp)?;
        assert!(close(higher.metrics.loss, -1.25) && higher.metrics.clip_frac_high == 0.0);
        assert_rows(&grad(&higher.loss, &lp)?, &[&[-1.25]]);
        Ok(())
    }

    #[test]
    fn kl_penalty_adds_beta_times_the_aggregated_estimate() -> Result<()> {
        // One completion of 2 tokens, A = 0 (no policy term); d = lp − ref = 0.5 and −1.
        let dev = Device::Cpu;
        let lp = Var::new(&[[-1.0f32, -2.0]], &dev)?;
        let rf = Tensor::new(&[[-1.5f32, -1.0]], &dev)?;
        let adv = Tensor::new(&[0f32], &dev)?;
        let mask = mask_from_lengths(&[2], 2, &dev)?;
        let mut inp = inputs(lp.as_tensor(), &adv, &mask);
        inp.ref_logprobs = Some(&rf);
        let k3 = [(-0.5f64).exp() + 0.5 - 1.0, 1f64.exp() - 1.0 - 1.0];
        for (est, per_tok) in [
            (KlEstimator::K1, [0.5, -1.0]),
            (KlEstimator::K2, [0.125, 0.5]),
            (KlEstimator::K3, k3),
        ] {
            let cfg = PolicyLossConfig {
                beta: 0.1,
                kl_estimator: est,
                ..Default::default()
            };
            let out = policy_loss(&cfg, &inp)?;
            let mean = (per_tok[0] + per_tok[1]) / 2.0;
            assert!(
                close(out.metrics.kl_term, mean),
                "{est:?}: {:?}",
                out.metrics
            );
            assert!(
                close(out.metrics.loss, 0.1 * mean),
                "{est:?}: {:?}",
                out.metrics
            );
            assert_eq!(out.metrics.mean_kl.map(|k| close(k, mean)), Some(true));
        }
        // beta = 0: the KL is reported but adds neither value nor gradient.
        let out = policy_loss(&PolicyLossConfig::default(), &inp)?;
        assert!(out.metrics.mean_kl.is_some() && close(out.metrics.loss, 0.0));
        assert_rows(&grad(&out.loss, &lp)?, &[&[0.0, 0.0]]);
        Ok(())
    }

    #[test]
    fn kl_gradient_flows_with_beta() -> Result<()> {
        // k3 gradient per token (1 − e^{−d}) · beta / 2 under seq-mean-token-mean.
        let dev = Device::Cpu;
        let lp = Var::new(&[[-1.0f32, -2.0]], &dev)?;
        let rf = Tensor::new(&[[-1.5f32, -1.0]], &dev)?;
        let adv = Tensor::new(&[0f32], &dev)?;
        let mask = mask_from_lengths(&[2], 2, &dev)?;
        let mut inp = inputs(lp.as_tensor(), &adv, &mask);
        inp.ref_logprobs = Some(&rf);
        let cfg = PolicyLossConfig {
            beta: 0.1,
            ..Default::default()
        };
        let out = policy_loss(&cfg, &inp)?;
        let g0 = (1.0 - (-0.5f64).exp()) * 0.05;
        let g1 = (1.0 - 1f64.exp()) * 0.05;
        assert_rows(&grad(&out.loss, &lp)?, &[&[g0, g1]]);
        Ok(())
    }

    #[test]
    fn beta_without_reference_is_an_error() -> Result<()> {
        let dev = Device::Cpu;
        let lp = Tensor::zeros((1, 2), DType::F32, &dev)?;
        let adv = Tensor::new(&[1f32], &dev)?;
        let mask = mask_from_lengths(&[2], 2, &dev)?;
        let cfg = PolicyLossConfig {
            beta: 0.1,
            ..Default::default()
        };
        assert!(matches!(
            policy_loss(&cfg, &inputs(&lp, &adv, &mask)),
            Err(Error::Config { field: "beta", .. })
        ));
        Ok(())
    }

    #[test]
    fn garbage_in_padding_does_not_reach_loss_or_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let lp = Var::new(&[[-1.0f32, f32::NAN, f32::NEG_INFINITY]], &dev)?;
        let old = Tensor::new(&[[-1.0f32, f32::INFINITY, f32::NAN]], &dev)?;
        let rf = Tensor::new(&[[-1.0f32, f32::NAN, 3.0]], &dev)?;
        let adv = Tensor::new(&[1f32], &dev)?;
        let mask = mask_from_lengths(&[1], 3, &dev)?;
        let mut inp = inputs(lp.as_tensor(), &adv, &mask);
        inp.old_logprobs = Some(&old);
        inp.ref_logprobs = Some(&rf);
        let cfg = PolicyLossConfig {
            beta: 0.1,
            ..Default::default()
        };
        let out = policy_loss(&cfg, &inp)?;
        assert!(close(out.metrics.loss, -1.0), "{:?}", out.metrics);
        assert_rows(&grad(&out.loss, &lp)?, &[&[-1.0, 0.0, 0.0]]);
        Ok(())
    }

    #[test]
    fn shapes_and_settings_are_checked() -> Result<()> {
        let dev = Device::Cpu;
        let lp = Tensor::zeros((2, 3), DType::F32, &dev)?;
        let adv = Tensor::new(&[1f32, 2.0], &dev)?;
        let mask = mask_from_lengths(&[3, 3], 3, &dev)?;
        let bad_mask = mask_from_lengths(&[3], 3, &dev)?;
        let bad_adv = Tensor::new(&[1f32], &dev)?;
        let cfg = PolicyLossConfig::default();
        assert!(matches!(
            policy_loss(&cfg, &inputs(&lp, &adv, &bad_mask)),
            Err(Error::Shape { name: "mask", .. })
        ));
        assert!(matches!(
            policy_loss(&cfg, &inputs(&lp, &bad_adv, &mask)),
            Err(Error::Shape {
                name: "advantages",
                ..
            })
        ));
        let nan_adv = Tensor::new(&[1f32, f32::NAN], &dev)?;
        assert!(matches!(
            policy_loss(&cfg, &inputs(&lp, &nan_adv, &mask)),
            Err(Error::NonFinite { .. })
        ));
        let bad = PolicyLossConfig {
            clip_low: 1.5,
            ..Default::default()
        };
        assert!(matches!(
            policy_loss(&bad, &inputs(&lp, &adv, &mask)),
            Err(Error::Config {
                field: "clip_low",
                ..
            })
        ));
        Ok(())
    }

    #[test]
    fn config_round_trips_through_json_with_kebab_case_modes() -> Result<()> {
        let json = r#"{"aggregation": "token-mean", "clip_high": 0.28, "kl_estimator": "k2"}"#;
        let cfg: PolicyLossConfig =
            serde_json::from_str(json).map_err(|e| Error::config("loss", e.to_string()))?;
        assert_eq!(cfg.aggregation, Aggregation::TokenMean);
        assert_eq!(cfg.kl_estimator, KlEstimator::K2);
        assert!(close(cfg.clip_high, 0.28) && close(cfg.clip_low, 0.2) && cfg.beta == 0.0);
        Ok(())
    }
}
