//! GRPO-CARE's consistency bonus, as the released trainer computes it (`grpo_trainer_ref_ema.py`).
//!
//! Per group: the completions that are accurate (accuracy > 0.1 and at least the group's mean
//! accuracy) and whose answer the EMA reference model finds about as likely as the accurate
//! ones do on average (confidence ≥ mean accurate confidence − margin) get
//! `bonus_coefficient · accuracy` added to their reward. Confidence is the geometric-mean
//! probability of the answer-span tokens under the reference model, clamped at 0.95.

pub mod ema;
pub mod span;

use std::ops::Range;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

pub use ema::{EmaConfig, ema_blend, ema_update};
pub use span::{released_answer_span, tagged_answer_span};

use crate::{Error, Result};

/// CARE settings (`algorithm.care` in a run config); defaults are the released run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CareConfig {
    /// Bonus per unit of accuracy for selected completions (`--bonus_coefficient 0.5`).
    pub bonus_coefficient: f64,
    /// Confidence is clamped at this value (`--confidence_upper_bound 0.95`); `None` = no clamp.
    pub confidence_upper_bound: Option<f64>,
    /// Slack below the mean accurate confidence that still counts as confident
    /// (`--consistency_margin 0.01`; the released code treats "no margin" as 0).
    pub consistency_margin: f64,
    /// Accuracy a completion must exceed to be a candidate (hard-coded 0.1 in the release).
    pub accuracy_threshold: f64,
}

impl Default for CareConfig {
    fn default() -> Self {
        Self {
            bonus_coefficient: 0.5,
            confidence_upper_bound: Some(0.95),
            consistency_margin: 0.01,
            accuracy_threshold: 0.1,
        }
    }
}

impl CareConfig {
    /// Checks that every setting is finite (and the bound positive).
    pub fn validate(&self) -> Result<()> {
        for (field, v) in [
            ("bonus_coefficient", self.bonus_coefficient),
            ("consistency_margin", self.consistency_margin),
            ("accuracy_threshold", self.accuracy_threshold),
        ] {
            if !v.is_finite() {
                return Err(Error::config(field, format!("must be finite, got {v}")));
            }
        }
        if let Some(b) = self.confidence_upper_bound
            && !(b.is_finite() && b > 0.0)
        {
            return Err(Error::config(
                "confidence_upper_bound",
                format!("must be finite and > 0, got {b}"),
            ));
        }
        Ok(())
    }
}

/// The bonus of each completion of one group and why.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct CareGroup {
    /// Bonus to add to each completion's reward.
    pub bonus: Vec<f64>,
    /// Accurate: accuracy above the threshold and at least the group mean.
    pub accurate: Vec<bool>,
    /// Confident: clamped confidence at least the mean accurate confidence minus the margin.
    pub confident: Vec<bool>,
    /// Confidences after the clamp.
    pub confidence: Vec<f64>,
    /// Mean clamped confidence of the accurate completions; `None` when none is accurate.
    pub mean_selected_confidence: Option<f64>,
}

/// CARE bonus for one group from each completion's accuracy reward and raw confidence.
///
/// Computed in f64 (the release uses f32; only exact ties at the threshold could differ).
pub fn care_bonus(cfg: &CareConfig, accuracy: &[f64], confidence: &[f64]) -> Result<CareGroup> {
    cfg.validate()?;
    if confidence.len() != accuracy.len() {
        return Err(Error::Length {
            name: "confidence",
            expected: accuracy.len(),
            got: confidence.len(),
        });
    }
    for (what, values) in [("accuracy", accuracy), ("confidence", confidence)] {
        if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(Error::NonFinite {
                what: format!("{what} {i}"),
                value: *v,
            });
        }
    }
    if accuracy.is_empty() {
        return Ok(CareGroup::default());
    }
    let clamped: Vec<f64> = confidence
        .iter()
        .map(|&c| cfg.confidence_upper_bound.map_or(c, |b| c.min(b)))
        .collect();
    let mean_acc = accuracy.iter().sum::<f64>() / accuracy.len() as f64;
    let accurate: Vec<bool> = accuracy
        .iter()
        .map(|&a| a > cfg.accuracy_threshold && a >= mean_acc)
        .collect();
    let selected: Vec<f64> = clamped
        .iter()
        .zip(&accurate)
        .filter_map(|(&c, &acc)| acc.then_some(c))
        .collect();
    // The release takes the mean of an empty selection (NaN), which makes every comparison
    // false: no completion is confident, and none is accurate anyway.
    let mean_sel =
        (!selected.is_empty()).then(|| selected.iter().sum::<f64>() / selected.len() as f64);
    let confident: Vec<bool> = clamped
        .iter()
        .map(|&c| mean_sel.is_some_and(|m| c >= m - cfg.consistency_margin))
        .collect();
    let bonus = accuracy
        .iter()
        .zip(accurate.iter().zip(&confident))
        .map(|(&a, (&acc, &conf))| {
            if acc && conf {
                a * cfg.bonus_coefficient
            } else {
                0.0
            }
        })
        .collect();
    Ok(CareGroup {
        bonus,
        accurate,
        confident,
        confidence: clamped,
        mean_selected_confidence: mean_sel,
    })
}

/// CARE bonuses for consecutive groups of `group_size` completions (the layout of a rollout
/// batch: all samples of prompt 0, then of prompt 1, ...).
pub fn care_bonus_grouped(
    cfg: &CareConfig,
    accuracy: &[f64],
    confidence: &[f64],
    group_size: usize,
) -> Result<Vec<CareGroup>> {
    if group_size == 0 || !accuracy.len().is_multiple_of(group_size) {
        return Err(Error::config(
            "group_size",
            format!(
                "{} completions do not split into groups of {group_size}",
                accuracy.len()
            ),
        ));
    }
    if confidence.len() != accuracy.len() {
        return Err(Error::Length {
            name: "confidence",
            expected: accuracy.len(),
            got: confidence.len(),
        });
    }
    accuracy
        .chunks(group_size)
        .zip(confidence.chunks(group_size))
        .map(|(a, c)| care_bonus(cfg, a, c))
        .collect()
}

/// Raw (unclamped) confidence of one completion: `exp(Σ_span ref_lp / (|span| + 1e-6))`.
///
/// The `1e-6` is the release's; it makes an empty or missing span give `exp(0) = 1` (which the
/// clamp then lowers to the upper bound) and shrinks every other mean by a relative 1e-6.
pub fn answer_confidence(ref_logprobs: &[f32], span: Option<Range<usize>>) -> Result<f64> {
    let span = span.unwrap_or(0..0);
    if span.end > ref_logprobs.len() || span.start > span.end {
        return Err(Error::Span {
            start: span.start,
            end: span.end,
            len: ref_logprobs.len(),
        });
    }
    let count = (span.end - span.start) as f64;
    let sum: f64 = ref_logprobs[span].iter().map(|&v| f64::from(v)).sum();
    Ok((sum / (count + 1e-6)).exp())
}

/// [`answer_confidence`] for every row of reference log-probs `[B, T]` (read back to the host).
pub fn answer_confidences(
    ref_logprobs: &Tensor,
    spans: &[Option<Range<usize>>],
) -> Result<Vec<f64>> {
    let (b, _) = ref_logprobs
        .dims2()
        .map_err(|_| Error::shape("ref_logprobs", "[B, T]", ref_logprobs.dims()))?;
    if spans.len() != b {
        return Err(Error::Length {
            name: "spans",
            expected: b,
            got: spans.len(),
        });
    }
    let rows = ref_logprobs.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    rows.iter()
        .zip(spans)
        .map(|(row, span)| answer_confidence(row, span.clone()))
        .collect()
}

/// The accuracy components of scored completions, in order, for [`care_bonus`].
pub fn accuracies(outcomes: &[medrl_vqa::RewardOutcome]) -> Vec<f64> {
    outcomes.iter().map(|o| o.components.accuracy).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_worked_group_of_eight() -> Result<()> {
        // Accuracy 1 for samples 0, 1, 2, 4 (mean 0.5: all four are accurate).
        // Raw confidences; clamped at 0.95: sample 0 → 0.95.
        let acc = [1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0];
        let conf = [0.99, 0.90, 0.70, 0.99, 0.855, 0.2, 0.3, 0.4];
        let g = care_bonus(&CareConfig::default(), &acc, &conf)?;
        // Mean accurate confidence (0.95 + 0.90 + 0.70 + 0.855) / 4 = 0.85125; threshold 0.84125.
        let m = g.mean_selected_confidence.expect("accurate samples exist");
        assert!((m - 0.85125).abs() < 1e-12, "{m}");
        assert_eq!(
            g.accurate,
            vec![true, true, true, false, true, false, false, false]
        );
        // Sample 3 is confident (0.95 ≥ 0.84125) but not accurate: no bonus.
        assert_eq!(
            g.confident,
            vec![true, true, false, true, true, false, false, false]
        );
        assert_eq!(g.bonus, vec![0.5, 0.5, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0]);
        assert_eq!(g.confidence[0], 0.95);
        Ok(())
    }

    #[test]
    fn margin_decides_a_borderline_sample() -> Result<()> {
        // Accurate confidences 0.8 and 0.785: mean 0.7925; 0.785 ≥ 0.7825 only with the margin.
        let acc = [1.0, 1.0, 0.0];
        let conf = [0.8, 0.785, 0.1];
        let with = care_bonus(&CareConfig::default(), &acc, &conf)?;
        assert_eq!(with.bonus, vec![0.5, 0.5, 0.0]);
        let without = care_bonus(
            &CareConfig {
                consistency_margin: 0.0,
                ..Default::default()
            },
            &acc,
            &conf,
        )?;
        assert_eq!(without.bonus, vec![0.5, 0.0, 0.0]);
        Ok(())
    }

    #[test]
    fn fractional_accuracy_must_reach_the_group_mean() -> Result<()> {
        // Mean accuracy 0.45: 0.3 is above the 0.1 threshold but below the mean.
        let acc = [1.0, 0.5, 0.3, 0.0];
        let conf = [0.6, 0.6, 0.6, 0.6];
        let g = care_bonus(&CareConfig::default(), &acc, &conf)?;
        assert_eq!(g.accurate, vec![true, true, false, false]);
        // The bonus scales with the accuracy reward: 0.5 · 1.0 and 0.5 · 0.5.
        assert_eq!(g.bonus, vec![0.5, 0.25, 0.0, 0.0]);
        Ok(())
    }

    #[test]
    fn all_wrong_and_all_right_groups() -> Result<()> {
        let none = care_bonus(&CareConfig::default(), &[0.0; 4], &[0.5; 4])?;
        assert_eq!(none.bonus, vec![0.0; 4]);
        assert_eq!(none.mean_selected_confidence, None);
        // All correct with equal confidence: everyone is at the mean, everyone gets the bonus.
        let all = care_bonus(&CareConfig::default(), &[1.0; 4], &[0.6; 4])?;
        assert_eq!(all.bonus, vec![0.5; 4]);
        Ok(())
    }

    #[test]
    fn grouped_splits_consecutive_groups() -> Result<()> {
        let acc = [1.0, 0.0, 0.0, 1.0];
        let conf = [0.9, 0.9, 0.1, 0.2];
        let groups = care_bonus_grouped(&CareConfig::default(), &acc, &conf, 2)?;
        assert_eq!(groups[0].bonus, vec![0.5, 0.0]);
        assert_eq!(groups[1].bonus, vec![0.0, 0.5]);
        assert!(care_bonus_grouped(&CareConfig::default(), &acc, &conf, 3).is_err());
        Ok(())
    }

    #[test]
    fn confidence_is_the_geometric_mean_with_the_release_epsilon() -> Result<()> {
        let lp = [-9.0f32, 0.5f32.ln(), 0.25f32.ln(), -9.0];
        let c = answer_confidence(&lp, Some(1..3))?;
        // exp((ln 0.5 + ln 0.25) / (2 + 1e-6)).
        let expected = ((0.5f64.ln() + 0.25f64.ln()) / (2.0 + 1e-6)).exp();
        assert!((c - expected).abs() < 1e-7, "{c} vs {expected}");
        assert!((c - 0.125f64.sqrt()).abs() < 1e-6);
        assert_eq!(answer_confidence(&lp, None)?, 1.0);
        assert!(matches!(
            answer_confidence(&lp, Some(2..9)),
            Err(Error::Span { .. })
        ));
        Ok(())
    }

    #[test]
    fn confidences_of_a_batch() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let lp = Tensor::new(&[[0f32, -1.0, -1.0], [-2.0, -2.0, -2.0]], &dev)?;
        let c = answer_confidences(&lp, &[Some(1..3), None])?;
        assert!(
            (c[0] - (-2.0f64 / (2.0 + 1e-6)).exp()).abs() < 1e-9,
            "{c:?}"
        );
        assert_eq!(c[1], 1.0);
        Ok(())
    }

    #[test]
    fn non_finite_inputs_are_rejected() {
        let r = care_bonus(&CareConfig::default(), &[1.0, f64::NAN], &[0.5, 0.5]);
        assert!(matches!(r, Err(Error::NonFinite { .. })));
        let r = care_bonus(&CareConfig::default(), &[1.0], &[0.5, 0.5]);
        assert!(matches!(r, Err(Error::Length { .. })));
    }
}
