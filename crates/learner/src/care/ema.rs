//! The EMA reference model of GRPO-CARE: every `every` optimizer steps,
//! `ref ← decay · ref + (1 − decay) · policy` (released: `torch.lerp(θ, θ_ref, 0.995)` after
//! optimizer steps 10, 20, ...).
//!
//! The arithmetic is done in f32 and rounded once to the reference's dtype, which is what torch's
//! bf16 `lerp` does. A consequence worth knowing: with a bf16 reference and decay 0.995, a weight
//! moves only once the policy is about 100 bf16 steps away from it (0.005 · k ulp must reach half
//! an ulp), so the released bf16 reference stays close to frozen at lr 5e-7. Keep the reference
//! in f32 (or pass f32 master weights as `policy`) for a reference that really averages.

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// When and how strongly the reference follows the policy (released: 0.995 every 10 steps).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmaConfig {
    /// Weight of the old reference (`--ref_ema_decay`).
    pub decay: f64,
    /// Update after every this many optimizer steps (`--ref_ema_update_every`); 0 = never.
    pub every: u64,
}

impl Default for EmaConfig {
    fn default() -> Self {
        Self {
            decay: 0.995,
            every: 10,
        }
    }
}

impl EmaConfig {
    /// Whether to update after the optimizer step that brought the count to `steps_done`
    /// (the release increments its step counter, then tests `step % every == 0`).
    pub fn is_due(&self, steps_done: u64) -> bool {
        self.every > 0 && steps_done > 0 && steps_done.is_multiple_of(self.every)
    }

    /// Checks `decay` is in [0, 1].
    pub fn validate(&self) -> Result<()> {
        if !(self.decay.is_finite() && (0.0..=1.0).contains(&self.decay)) {
            return Err(Error::config(
                "decay",
                format!("must be in [0, 1], got {}", self.decay),
            ));
        }
        Ok(())
    }
}

/// `decay · reference + (1 − decay) · policy`, in f32 and returned in `reference`'s dtype.
///
/// Written as torch's lerp with weight ≥ 0.5 computes it: `ref − (ref − policy) · (1 − decay)`,
/// with `1 − decay` formed in f32.
pub fn ema_blend(reference: &Tensor, policy: &Tensor, decay: f64) -> Result<Tensor> {
    if reference.dims() != policy.dims() {
        return Err(Error::shape(
            "policy",
            format!("{:?} like the reference", reference.dims()),
            policy.dims(),
        ));
    }
    let r = reference.detach().to_dtype(DType::F32)?;
    let p = policy.detach().to_dtype(DType::F32)?;
    let w = 1f32 - decay as f32;
    let out = (&r - ((&r - &p)? * f64::from(w))?)?;
    Ok(out.to_dtype(reference.dtype())?)
}

/// Updates every reference `Var` in place from the policy tensor at the same index.
pub fn ema_update(reference: &[Var], policy: &[Tensor], decay: f64) -> Result<()> {
    EmaConfig { decay, every: 1 }.validate()?;
    if reference.len() != policy.len() {
        return Err(Error::Length {
            name: "policy",
            expected: reference.len(),
            got: policy.len(),
        });
    }
    for (r, p) in reference.iter().zip(policy) {
        let blended = ema_blend(r.as_tensor(), p, decay)?;
        r.set(&blended)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn one_update_by_hand() -> Result<()> {
        let dev = Device::Cpu;
        let r = Var::new(&[1.0f32, -2.0, 0.0], &dev)?;
        let p = Tensor::new(&[2.0f32, 2.0, 1.0], &dev)?;
        ema_update(std::slice::from_ref(&r), &[p], 0.995)?;
        // 0.995·1 + 0.005·2 = 1.005; 0.995·(−2) + 0.005·2 = −1.98; 0.005.
        let got = r.as_tensor().to_vec1::<f32>()?;
        for (g, e) in got.iter().zip([1.005f64, -1.98, 0.005]) {
            assert!((f64::from(*g) - e).abs() < 1e-6, "{got:?}");
        }
        Ok(())
    }

    #[test]
    fn repeated_updates_converge_geometrically() -> Result<()> {
        // After k updates towards a fixed policy: ref = p + (r0 − p)·decay^k.
        let dev = Device::Cpu;
        let r = Var::new(&[0.0f32], &dev)?;
        let p = Tensor::new(&[1.0f32], &dev)?;
        for _ in 0..100 {
            ema_update(std::slice::from_ref(&r), std::slice::from_ref(&p), 0.9)?;
        }
        let got = f64::from(r.as_tensor().to_vec1::<f32>()?[0]);
        let expected = 1.0 - 0.9f64.powi(100);
        assert!((got - expected).abs() < 1e-5, "{got} vs {expected}");
        Ok(())
    }

    #[test]
    fn schedule_is_every_tenth_step_after_the_increment() {
        let cfg = EmaConfig::default();
        let due: Vec<u64> = (0..=30).filter(|&s| cfg.is_due(s)).collect();
        assert_eq!(due, vec![10, 20, 30]);
        assert!(!EmaConfig { every: 0, ..cfg }.is_due(10));
    }

    #[test]
    fn bf16_reference_ignores_a_one_ulp_policy_move() -> Result<()> {
        // 1.0 and its next bf16 value 1.0078125 (1 ulp): 0.005 ulp rounds back to the reference.
        let dev = Device::Cpu;
        let r = Tensor::new(&[1.0f32], &dev)?.to_dtype(DType::BF16)?;
        let p = Tensor::new(&[1.0078125f32], &dev)?.to_dtype(DType::BF16)?;
        let out = ema_blend(&r, &p, 0.995)?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        assert_eq!(out, vec![1.0]);
        // In f32 the same blend moves: 1 + 0.005·0.0078125.
        let out32 = ema_blend(&r.to_dtype(DType::F32)?, &p, 0.995)?.to_vec1::<f32>()?;
        assert!(
            (f64::from(out32[0]) - (1.0 + 0.005 * 0.0078125)).abs() < 1e-7,
            "{out32:?}"
        );
        Ok(())
    }

    #[test]
    fn mismatched_lists_are_an_error() -> Result<()> {
        let dev = Device::Cpu;
        let r = Var::new(&[1.0f32], &dev)?;
        assert!(matches!(
            ema_update(&[r], &[], 0.9),
            Err(Error::Length { .. })
        ));
        Ok(())
    }
}
