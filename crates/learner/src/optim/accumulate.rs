//! Gradient accumulation: sums the gradients of several micro-batches for a fixed set of
//! variables, so one optimizer step can cover a batch too large for one backward pass.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::optim::{Placement, host};
use crate::{Error, Result};

/// Running sums of the gradients of `vars` over micro-batches.
///
/// The first micro-batch's gradients are kept as they came (dtype and device): a step of one
/// micro-batch (the paper's setting) needs no copy at all, which at 7B is 33 GB of f32 sums.
/// From the second on, sums are f32 whatever the gradient dtype, so that many bf16 micro-batch
/// gradients do not lose their small contributions; sums in host memory are added on all cores.
#[derive(Debug)]
pub struct GradAccumulator {
    vars: Vec<Var>,
    sums: Vec<Option<Tensor>>,
    placement: Placement,
    micro_batches: usize,
}

impl GradAccumulator {
    /// An empty accumulator for `vars`, keeping its sums where `placement` says.
    pub fn new(vars: Vec<Var>, placement: Placement) -> Self {
        let sums = vec![None; vars.len()];
        GradAccumulator {
            vars,
            sums,
            placement,
            micro_batches: 0,
        }
    }

    /// Adds one micro-batch's gradients.
    pub fn add(&mut self, grads: &GradStore) -> Result<()> {
        self.add_scaled(grads, 1.0)
    }

    /// Adds one micro-batch's gradients times `scale` (e.g. its share of the batch).
    pub fn add_scaled(&mut self, grads: &GradStore, scale: f64) -> Result<()> {
        if !scale.is_finite() {
            return Err(Error::NonFinite {
                what: "accumulation scale".into(),
                value: scale,
            });
        }
        for (var, sum) in self.vars.iter().zip(self.sums.iter_mut()) {
            let Some(g) = grads.get(var.as_tensor()) else { continue };
            let g = g.detach();
            *sum = Some(match sum.take() {
                None if self.micro_batches == 0 && scale == 1.0 => g,
                prior if self.placement.device(var.device()).is_cpu() => {
                    let prior = match prior {
                        Some(p) if p.dtype() != DType::F32 || !p.device().is_cpu() => Some(host::accumulate(None, &p, 1.0)?),
                        p => p,
                    };
                    host::accumulate(prior.as_ref(), &g, scale as f32)?
                }
                prior => {
                    let g = g.to_dtype(DType::F32)?;
                    let g = if scale == 1.0 { g } else { (g * scale)? };
                    match prior {
                        Some(acc) => (acc.to_dtype(DType::F32)? + g)?,
                        None => g,
                    }
                }
            });
        }
        self.micro_batches += 1;
        Ok(())
    }

    /// Micro-batches added since the last `take`.
    pub fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    /// The sums times `scale` as a `GradStore` keyed by the variables; resets the accumulator.
    /// Variables that never had a gradient get no entry (the optimizer then skips them).
    pub fn take(&mut self, scale: f64) -> Result<GradStore> {
        let mut out = GradStore::default();
        for (var, sum) in self.vars.iter().zip(self.sums.iter_mut()) {
            if let Some(s) = sum.take() {
                let s = match (scale == 1.0, s.device().is_cpu()) {
                    (true, _) => s,
                    (false, true) => host::scaled(&s, scale as f32)?,
                    (false, false) => (s.to_dtype(DType::F32)? * scale)?,
                };
                out.insert(var.as_tensor(), s);
            }
        }
        self.micro_batches = 0;
        Ok(out)
    }

    /// The mean over the micro-batches added (HF's gradient accumulation divides each
    /// micro-batch loss by their number); resets the accumulator.
    pub fn take_mean(&mut self) -> Result<GradStore> {
        if self.micro_batches == 0 {
            return Err(Error::EmptyBatch("no micro-batch was accumulated".into()));
        }
        let n = self.micro_batches as f64;
        self.take(1.0 / n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn accumulated_gradient_equals_the_full_batch_gradient() -> Result<()> {
        // loss(w) = mean_i (w·x_i − y_i)²; the full-batch gradient equals the mean of the two
        // half-batch gradients.
        let dev = Device::Cpu;
        let w = Var::new(&[0.5f32, -1.0], &dev)?;
        let x = Tensor::new(&[[1f32, 2.0], [3.0, -1.0], [0.5, 0.5], [-2.0, 1.0]], &dev)?;
        let y = Tensor::new(&[[1f32], [0.0], [2.0], [-1.0]], &dev)?;
        let loss = |xs: &Tensor, ys: &Tensor| -> Result<Tensor> {
            let pred = xs.matmul(&w.as_tensor().unsqueeze(1)?)?;
            Ok((pred - ys)?.sqr()?.mean_all()?)
        };
        let full = loss(&x, &y)?.backward()?;
        let full = full
            .get(w.as_tensor())
            .expect("gradient")
            .to_vec1::<f32>()?;

        let mut acc = GradAccumulator::new(vec![w.clone()], Placement::WithWeights);
        for start in [0, 2] {
            acc.add(&loss(&x.narrow(0, start, 2)?, &y.narrow(0, start, 2)?)?.backward()?)?;
        }
        assert_eq!(acc.micro_batches(), 2);
        let mean = acc.take_mean()?;
        let mean = mean
            .get(w.as_tensor())
            .expect("accumulated")
            .to_vec1::<f32>()?;
        for (a, b) in full.iter().zip(&mean) {
            assert!((a - b).abs() < 1e-6, "{full:?} vs {mean:?}");
        }
        assert_eq!(acc.micro_batches(), 0);
        assert!(acc.take_mean().is_err());
        Ok(())
    }

    #[test]
    fn scaled_sums_and_missing_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let a = Var::zeros(1, DType::F32, &dev)?;
        let b = Var::zeros(1, DType::F32, &dev)?;
        let mut acc = GradAccumulator::new(vec![a.clone(), b.clone()], Placement::WithWeights);
        for (g, s) in [(2f32, 0.25), (4.0, 0.5)] {
            let mut store = GradStore::default();
            store.insert(a.as_tensor(), Tensor::new(&[g], &dev)?);
            acc.add_scaled(&store, s)?;
        }
        let out = acc.take(2.0)?;
        // (2·0.25 + 4·0.5)·2 = 5.
        assert_eq!(
            out.get(a.as_tensor()).expect("a").to_vec1::<f32>()?,
            vec![5.0]
        );
        assert!(out.get(b.as_tensor()).is_none());
        Ok(())
    }

    #[test]
    fn one_micro_batch_passes_through_and_more_sum_in_f32() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::zeros(2, DType::BF16, &dev)?;
        let store = |v: [f32; 2]| -> Result<GradStore> {
            let mut s = GradStore::default();
            s.insert(w.as_tensor(), Tensor::new(&v, &dev)?.to_dtype(DType::BF16)?);
            Ok(s)
        };
        for placement in [Placement::WithWeights, Placement::Host] {
            let mut acc = GradAccumulator::new(vec![w.clone()], placement);
            acc.add(&store([1.0, -3.0])?)?;
            let one = acc.take(1.0)?;
            let g = one.get(w.as_tensor()).expect("gradient");
            assert_eq!(g.dtype(), DType::BF16, "{placement:?}: one micro-batch is not copied");
            // 1 + 2^-10 is exact in f32 and rounds back to 1 in bf16.
            acc.add(&store([1.0, -3.0])?)?;
            acc.add(&store([1.0 / 1024.0, 0.5])?)?;
            let two = acc.take(1.0)?;
            let g = two.get(w.as_tensor()).expect("sum");
            assert_eq!(g.dtype(), DType::F32, "{placement:?}");
            assert_eq!(g.to_vec1::<f32>()?, vec![1.0 + 1.0 / 1024.0, -2.5], "{placement:?}");
        }
        Ok(())
    }
}
