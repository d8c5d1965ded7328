//! Per-token estimators of KL(policy ‖ reference) from sampled tokens (Schulman's k1 / k2 / k3).

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::Result;

/// Which single-sample KL estimator to use; `d = logp − ref_logp` of the sampled token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KlEstimator {
    /// `d`: unbiased, high variance, can be negative.
    K1,
    /// `d² / 2`: biased, low variance, never negative.
    K2,
    /// `exp(−d) + d − 1` (= `exp(ref − lp) − (ref − lp) − 1`): unbiased and never negative; what
    /// TRL, verl's `low_var_kl` and the released GRPO-CARE trainer compute.
    #[default]
    K3,
}

/// Per-token KL estimate `[B, T]` (f32), differentiable in `logprobs`; `ref_logprobs` is detached.
///
/// With `log_ratio_clamp = Some(c)` the log-ratio is clamped to `[−c, c]` first: the released
/// trainer clamps `ref − lp` to `[−10, 10]` before k3 so that one very unlikely token cannot
/// produce `exp(large)`. Clamped tokens get no gradient, as in torch.
pub fn per_token_kl(
    estimator: KlEstimator,
    logprobs: &Tensor,
    ref_logprobs: &Tensor,
    log_ratio_clamp: Option<f64>,
) -> Result<Tensor> {
    let lp = logprobs.to_dtype(DType::F32)?;
    let reference = ref_logprobs.detach().to_dtype(DType::F32)?;
    let d = (lp - reference)?;
    let d = match log_ratio_clamp {
        Some(c) => d.clamp(-c, c)?,
        None => d,
    };
    Ok(match estimator {
        KlEstimator::K1 => d,
        KlEstimator::K2 => (d.sqr()? * 0.5)?,
        KlEstimator::K3 => ((d.neg()?.exp()? + d)? - 1.0)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn close(a: f32, b: f64) -> bool {
        (f64::from(a) - b).abs() < 1e-6
    }

    #[test]
    fn estimators_by_hand() -> Result<()> {
        let dev = Device::Cpu;
        // d = lp − ref = 0.5 and −1.0.
        let lp = Tensor::new(&[[-1.0f32, -2.0]], &dev)?;
        let rf = Tensor::new(&[[-1.5f32, -1.0]], &dev)?;
        let k1 = per_token_kl(KlEstimator::K1, &lp, &rf, None)?.to_vec2::<f32>()?;
        let k2 = per_token_kl(KlEstimator::K2, &lp, &rf, None)?.to_vec2::<f32>()?;
        let k3 = per_token_kl(KlEstimator::K3, &lp, &rf, None)?.to_vec2::<f32>()?;
        assert!(close(k1[0][0], 0.5) && close(k1[0][1], -1.0), "{k1:?}");
        assert!(close(k2[0][0], 0.125) && close(k2[0][1], 0.5), "{k2:?}");
        // exp(−0.5) + 0.5 − 1 = 0.10653066; exp(1) − 1 − 1 = 0.71828183.
        assert!(close(k3[0][0], 0.106_530_659_712_633_4), "{k3:?}");
        assert!(close(k3[0][1], 0.718_281_828_459_045), "{k3:?}");
        Ok(())
    }

    #[test]
    fn k3_gradient_is_one_minus_exp_minus_d() -> Result<()> {
        let dev = Device::Cpu;
        let lp = Var::new(&[[-1.0f32, -2.0]], &dev)?;
        let rf = Tensor::new(&[[-1.5f32, -1.0]], &dev)?;
        let g = per_token_kl(KlEstimator::K3, lp.as_tensor(), &rf, None)?
            .sum_all()?
            .backward()?;
        let g = g
            .get(lp.as_tensor())
            .expect("logprobs gradient")
            .to_vec2::<f32>()?;
        // d/dd (e^{−d} + d − 1) = 1 − e^{−d}: 1 − e^{−0.5} = 0.39346934, 1 − e = −1.71828183.
        assert!(close(g[0][0], 0.393_469_340_287_366_6), "{g:?}");
        assert!(close(g[0][1], -1.718_281_828_459_045), "{g:?}");
        Ok(())
    }

    #[test]
    fn clamp_limits_the_log_ratio() -> Result<()> {
        let dev = Device::Cpu;
        // ref − lp = 30 would give e^30; clamped to 10: e^10 − 10 − 1.
        let lp = Tensor::new(&[[-40.0f32]], &dev)?;
        let rf = Tensor::new(&[[-10.0f32]], &dev)?;
        let k3 = per_token_kl(KlEstimator::K3, &lp, &rf, Some(10.0))?.to_vec2::<f32>()?;
        let expected = 10f64.exp() - 11.0;
        assert!(
            (f64::from(k3[0][0]) - expected).abs() / expected < 1e-6,
            "{k3:?}"
        );
        Ok(())
    }
}
