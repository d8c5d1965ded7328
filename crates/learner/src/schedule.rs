//! Learning-rate schedules with linear warm-up, matching transformers'
//! `get_{constant,linear,cosine}_schedule_with_warmup` (driven, like torch's `LambdaLR`, by the
//! number of optimizer steps already taken).

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Shape of the schedule after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleKind {
    /// Stay at the base rate (`constant_with_warmup`; plain `constant` when warm-up is 0).
    Constant,
    /// Linear decay to 0 at the last step (the HF Trainer default, the released run).
    #[default]
    Linear,
    /// Half-cosine decay to 0 (with the default `num_cycles` 0.5).
    Cosine,
}

/// Schedule settings (`optimizer.schedule` in a run config); default: linear, no warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Shape after warm-up.
    pub kind: ScheduleKind,
    /// Warm-up length in steps; when 0, `warmup_ratio` decides (HF's precedence).
    pub warmup_steps: u64,
    /// Warm-up as a fraction of the total steps, rounded up (`ceil(total · ratio)`).
    pub warmup_ratio: f64,
    /// Cosine cycles over the decay phase (0.5 = one half-cosine down to 0).
    pub num_cycles: f64,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            kind: ScheduleKind::Linear,
            warmup_steps: 0,
            warmup_ratio: 0.0,
            num_cycles: 0.5,
        }
    }
}

/// A schedule resolved for a run of `total_steps` optimizer steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    kind: ScheduleKind,
    base_lr: f64,
    total_steps: u64,
    warmup_steps: u64,
    num_cycles: f64,
}

impl LrSchedule {
    /// Resolves `cfg` for a run of `total_steps` steps at peak rate `base_lr`.
    pub fn new(cfg: &ScheduleConfig, base_lr: f64, total_steps: u64) -> Result<Self> {
        if !(base_lr.is_finite() && base_lr >= 0.0) {
            return Err(Error::config(
                "lr",
                format!("must be finite and >= 0, got {base_lr}"),
            ));
        }
        if !(cfg.warmup_ratio.is_finite() && (0.0..=1.0).contains(&cfg.warmup_ratio)) {
            return Err(Error::config(
                "warmup_ratio",
                format!("must be in [0, 1], got {}", cfg.warmup_ratio),
            ));
        }
        if !cfg.num_cycles.is_finite() {
            return Err(Error::config(
                "num_cycles",
                format!("must be finite, got {}", cfg.num_cycles),
            ));
        }
        let warmup_steps = if cfg.warmup_steps > 0 {
            cfg.warmup_steps
        } else {
            // Step counts are far below 2^53, so the f64 round trip is exact.
            (total_steps as f64 * cfg.warmup_ratio).ceil() as u64
        };
        Ok(LrSchedule {
            kind: cfg.kind,
            base_lr,
            total_steps,
            warmup_steps,
            num_cycles: cfg.num_cycles,
        })
    }

    /// Warm-up length in steps after resolving the ratio.
    pub fn warmup_steps(&self) -> u64 {
        self.warmup_steps
    }

    /// The multiplier of the base rate for the optimizer step taken after `step` steps.
    ///
    /// Past `total_steps` the formulas are transformers' unchanged (linear stays at 0; cosine
    /// follows the cosine).
    pub fn factor(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return step as f64 / self.warmup_steps.max(1) as f64;
        }
        let decay_len = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => ((self.total_steps as f64 - step as f64) / decay_len).max(0.0),
            ScheduleKind::Cosine => {
                let progress = (step - self.warmup_steps) as f64 / decay_len;
                let c = (std::f64::consts::PI * self.num_cycles * 2.0 * progress).cos();
                (0.5 * (1.0 + c)).max(0.0)
            }
        }
    }

    /// The learning rate of the optimizer step taken after `step` steps.
    pub fn lr(&self, step: u64) -> f64 {
        self.base_lr * self.factor(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(kind: ScheduleKind, warmup_steps: u64, total: u64) -> Result<LrSchedule> {
        LrSchedule::new(
            &ScheduleConfig {
                kind,
                warmup_steps,
                ..Default::default()
            },
            2.0,
            total,
        )
    }

    fn check(s: &LrSchedule, points: &[(u64, f64)]) {
        for &(step, want) in points {
            let got = s.factor(step);
            assert!((got - want).abs() < 1e-12, "step {step}: {got} vs {want}");
        }
    }

    #[test]
    fn released_linear_without_warmup() -> Result<()> {
        // First step at the full rate, last step (99) at 1/100, 0 after the end.
        let s = schedule(ScheduleKind::Linear, 0, 100)?;
        check(
            &s,
            &[(0, 1.0), (50, 0.5), (99, 0.01), (100, 0.0), (150, 0.0)],
        );
        assert!((s.lr(50) - 1.0).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn linear_with_warmup() -> Result<()> {
        // Warm-up 10 of 110: 0, 0.5 at 5, 1 at 10; decay over 100 steps.
        let s = schedule(ScheduleKind::Linear, 10, 110)?;
        check(&s, &[(0, 0.0), (5, 0.5), (10, 1.0), (60, 0.5), (110, 0.0)]);
        Ok(())
    }

    #[test]
    fn cosine_with_warmup() -> Result<()> {
        let s = schedule(ScheduleKind::Cosine, 10, 110)?;
        // progress 0.25 → 0.5(1 + cos(π/4)); 0.5 → 0.5; 1 → 0.
        let quarter = 0.5 * (1.0 + std::f64::consts::FRAC_1_SQRT_2);
        check(
            &s,
            &[
                (0, 0.0),
                (5, 0.5),
                (10, 1.0),
                (35, quarter),
                (60, 0.5),
                (110, 0.0),
            ],
        );
        Ok(())
    }

    #[test]
    fn constant_with_warmup() -> Result<()> {
        let s = schedule(ScheduleKind::Constant, 4, 100)?;
        check(&s, &[(0, 0.0), (1, 0.25), (4, 1.0), (99, 1.0)]);
        let plain = schedule(ScheduleKind::Constant, 0, 100)?;
        check(&plain, &[(0, 1.0), (100, 1.0)]);
        Ok(())
    }

    #[test]
    fn warmup_ratio_rounds_up_and_steps_take_precedence() -> Result<()> {
        let cfg = ScheduleConfig {
            warmup_ratio: 0.25,
            ..Default::default()
        };
        assert_eq!(LrSchedule::new(&cfg, 1.0, 10)?.warmup_steps(), 3);
        let both = ScheduleConfig {
            warmup_steps: 7,
            warmup_ratio: 0.25,
            ..Default::default()
        };
        assert_eq!(LrSchedule::new(&both, 1.0, 10)?.warmup_steps(), 7);
        let bad = ScheduleConfig {
            warmup_ratio: 1.5,
            ..Default::default()
        };
        assert!(LrSchedule::new(&bad, 1.0, 10).is_err());
        Ok(())
    }

    #[test]
    fn config_reads_kebab_case_kinds() -> Result<()> {
        let cfg: ScheduleConfig =
            serde_json::from_str(r#"{"kind": "cosine", "warmup_ratio": 0.1}"#)
                .map_err(|e| Error::config("schedule", e.to_string()))?;
        assert_eq!(cfg.kind, ScheduleKind::Cosine);
        assert_eq!(cfg.num_cycles, 0.5);
        Ok(())
    }
}
