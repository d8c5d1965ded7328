//! Global-norm gradient clipping, as `torch.nn.utils.clip_grad_norm_` (the HF Trainer's
//! `max_grad_norm`, 5 in the released run).

use candle_core::backprop::GradStore;
use candle_core::{DType, Var};

use crate::optim::host;
use crate::{Error, Result};

/// The L2 norm of all gradients of `vars` together (variables without a gradient count as 0).
///
/// Squares are summed per tensor in f32 and across tensors in f64 (host tensors: in f64 per
/// block of elements, on all cores).
pub fn grad_norm(grads: &GradStore, vars: &[Var]) -> Result<f64> {
    let mut sum = 0f64;
    for var in vars {
        if let Some(g) = grads.get(var.as_tensor()) {
            sum += if g.device().is_cpu() {
                host::sum_squares(g)?
            } else {
                f64::from(g.to_dtype(DType::F32)?.sqr()?.sum_all()?.to_scalar::<f32>()?)
            };
        }
    }
    Ok(sum.sqrt())
}

/// Scales the gradients of `vars` so that their global norm is at most `max_norm`, and returns
/// the norm before clipping.
///
/// torch's rule: coefficient `max_norm / (norm + 1e-6)`, applied when below 1. Scaled gradients
/// are stored back as f32 in host memory and in their own dtype on a GPU. `max_norm <= 0` disables clipping (the HF Trainer's convention) but
/// still measures the norm. A NaN or infinite norm is an error and leaves the gradients as they
/// were, so the caller can skip the step (torch would scale everything to NaN).
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<f64> {
    if max_norm.is_nan() {
        return Err(Error::config("max_grad_norm", "is NaN"));
    }
    let norm = grad_norm(grads, vars)?;
    if !norm.is_finite() {
        return Err(Error::NonFinite {
            what: "gradient norm".into(),
            value: norm,
        });
    }
    if max_norm <= 0.0 {
        return Ok(norm);
    }
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        tracing::debug!(norm, max_norm, coef, "clipping gradients");
        for var in vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                // On a GPU in the gradient's own dtype, like torch's in-place `mul_`: an f32 copy
                // of bf16 gradients would double their memory (16.6 GB more at 7B).
                let scaled = if g.device().is_cpu() { host::scaled(g, coef as f32)? } else { (g * coef)? };
                grads.insert(var.as_tensor(), scaled);
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn store(a: &Var, b: &Var) -> Result<GradStore> {
        let dev = Device::Cpu;
        let mut s = GradStore::default();
        // Global norm sqrt(3² + 4² + 12²) = 13.
        s.insert(a.as_tensor(), Tensor::new(&[3f32, 4.0], &dev)?);
        s.insert(b.as_tensor(), Tensor::new(&[12f32], &dev)?);
        Ok(s)
    }

    fn get(s: &GradStore, v: &Var) -> Result<Vec<f32>> {
        Ok(s.get(v.as_tensor()).expect("gradient").to_vec1::<f32>()?)
    }

    #[test]
    fn clips_to_max_norm_and_returns_the_norm_before() -> Result<()> {
        let dev = Device::Cpu;
        let (a, b) = (
            Var::zeros(2, DType::F32, &dev)?,
            Var::zeros(1, DType::F32, &dev)?,
        );
        let mut s = store(&a, &b)?;
        let norm = clip_grad_norm(&mut s, &[a.clone(), b.clone()], 5.0)?;
        assert!((norm - 13.0).abs() < 1e-6);
        let coef = 5.0 / (13.0 + 1e-6);
        for (got, want) in get(&s, &a)?
            .iter()
            .chain(&get(&s, &b)?)
            .zip([3.0, 4.0, 12.0])
        {
            assert!(
                (f64::from(*got) - want * coef).abs() < 1e-6,
                "{got} vs {}",
                want * coef
            );
        }
        assert!((grad_norm(&s, &[a, b])? - 5.0).abs() < 1e-5);
        Ok(())
    }

    #[test]
    fn below_the_limit_nothing_changes() -> Result<()> {
        let dev = Device::Cpu;
        let (a, b) = (
            Var::zeros(2, DType::F32, &dev)?,
            Var::zeros(1, DType::F32, &dev)?,
        );
        let mut s = store(&a, &b)?;
        let norm = clip_grad_norm(&mut s, &[a.clone(), b.clone()], 20.0)?;
        assert!((norm - 13.0).abs() < 1e-6);
        assert_eq!(get(&s, &a)?, vec![3.0, 4.0]);
        // Disabled clipping still reports the norm.
        assert!((clip_grad_norm(&mut s, &[a.clone(), b], 0.0)? - 13.0).abs() < 1e-6);
        assert_eq!(get(&s, &a)?, vec![3.0, 4.0]);
        Ok(())
    }

    #[test]
    fn tiny_norms_show_the_1e_6_guard() -> Result<()> {
        // Norm 1e-6, max 5e-7: torch's coefficient is 5e-7 / (1e-6 + 1e-6) = 0.25, not 0.5.
        let dev = Device::Cpu;
        let a = Var::zeros(2, DType::F32, &dev)?;
        let mut s = GradStore::default();
        s.insert(a.as_tensor(), Tensor::new(&[6e-7f32, 8e-7], &dev)?);
        let norm = clip_grad_norm(&mut s, std::slice::from_ref(&a), 5e-7)?;
        assert!((norm - 1e-6).abs() < 1e-12, "{norm}");
        for (got, want) in get(&s, &a)?.iter().zip([1.5e-7, 2e-7]) {
            assert!((f64::from(*got) - want).abs() < 1e-12, "{got} vs {want}");
        }
        Ok(())
    }

    #[test]
    fn non_finite_norm_is_an_error() -> Result<()> {
        let dev = Device::Cpu;
        let a = Var::zeros(1, DType::F32, &dev)?;
        let mut s = GradStore::default();
        s.insert(a.as_tensor(), Tensor::new(&[f32::NAN], &dev)?);
        assert!(matches!(
            clip_grad_norm(&mut s, &[a], 5.0),
            Err(Error::NonFinite { .. })
        ));
        Ok(())
    }
}
