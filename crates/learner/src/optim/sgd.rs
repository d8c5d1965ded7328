//! Plain SGD `θ ← θ − lr·g` (no momentum, no weight decay), for gradient checks and tests.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::Result;
use crate::optim::Optimizer;
use crate::optim::adamw::compute_dtype;

/// Plain stochastic gradient descent; the update is computed in f32 (f64 for f64 variables) and
/// rounded once to the variable's dtype. It keeps no master copy, so tiny bf16 steps round away.
#[derive(Debug, Clone)]
pub struct Sgd {
    vars: Vec<Var>,
    lr: f64,
}

impl Sgd {
    /// SGD over `vars` at learning rate `lr`.
    pub fn new(vars: Vec<Var>, lr: f64) -> Self {
        Sgd { vars, lr }
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        for var in &self.vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                let cd = compute_dtype(var.dtype());
                let theta = var.as_tensor().detach().to_dtype(cd)?;
                let next: Tensor = (theta - (g.detach().to_dtype(cd)? * self.lr)?)?;
                var.set(&next.to_dtype(var.dtype())?)?;
            }
        }
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.lr = lr;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn one_step_by_hand() -> Result<()> {
        let dev = Device::Cpu;
        let v = Var::new(&[1.0f32, -2.0], &dev)?;
        let mut store = GradStore::default();
        store.insert(v.as_tensor(), Tensor::new(&[0.5f32, -4.0], &dev)?);
        let mut sgd = Sgd::new(vec![v.clone()], 0.25);
        sgd.step(&store)?;
        assert_eq!(v.as_tensor().to_vec1::<f32>()?, vec![0.875, -1.0]);
        Ok(())
    }
}
