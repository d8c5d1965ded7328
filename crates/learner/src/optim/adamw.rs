//! AdamW with f32 master weights, matching `torch.optim.AdamW` (single-tensor path).
//!
//! Why masters: at lr 5e-7 an Adam step moves a weight by about 5e-7, while a bf16 weight of
//! magnitude 1e-2 has a spacing of 6e-5; applied to the bf16 weight directly the step rounds
//! away and training silently stops. Here every trainable `Var` has an f32 master copy (the
//! `Var` itself when it is already f32) that accumulates the steps; the `Var` is set from the
//! master, rounded to its dtype, after each step. DeepSpeed's bf16 mode (the paper's stack) does
//! the same.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::optim::Optimizer;
use crate::{Error, Result};

/// Storage dtype of the two Adam moments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MomentDType {
    /// f32 moments (as DeepSpeed keeps them).
    #[default]
    F32,
    /// bf16 moments: half the memory; the update itself is still computed in f32.
    Bf16,
}

impl MomentDType {
    fn dtype(self, compute: DType) -> DType {
        match self {
            MomentDType::F32 => compute,
            MomentDType::Bf16 => DType::BF16,
        }
    }
}

/// AdamW hyper-parameters (`optimizer` in a run config); defaults are the released run (HF
/// Trainer defaults with `--learning_rate 5e-7`, weight decay 0).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamWConfig {
    /// Learning rate (the schedule overrides it each step).
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the bias-corrected RMS.
    pub eps: f64,
    /// Decoupled weight decay: `θ ← θ·(1 − lr·wd)` before the Adam update.
    pub weight_decay: f64,
    /// Storage dtype of the moments.
    pub moments: MomentDType,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 5e-7,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            moments: MomentDType::F32,
        }
    }
}

impl AdamWConfig {
    /// Checks the ranges torch checks.
    pub fn validate(&self) -> Result<()> {
        let check = |field: &'static str, ok: bool, v: f64| {
            if ok {
                Ok(())
            } else {
                Err(Error::config(field, format!("out of range: {v}")))
            }
        };
        check("lr", self.lr.is_finite() && self.lr >= 0.0, self.lr)?;
        check("beta1", (0.0..1.0).contains(&self.beta1), self.beta1)?;
        check("beta2", (0.0..1.0).contains(&self.beta2), self.beta2)?;
        check("eps", self.eps.is_finite() && self.eps >= 0.0, self.eps)?;
        check(
            "weight_decay",
            self.weight_decay.is_finite() && self.weight_decay >= 0.0,
            self.weight_decay,
        )
    }
}

/// One trainable tensor and its optimizer state.
#[derive(Debug)]
pub(crate) struct ParamState {
    pub(crate) name: String,
    pub(crate) var: Var,
    /// f32 master copy; `None` when the `Var` already has the compute dtype.
    pub(crate) master: Option<Tensor>,
    pub(crate) exp_avg: Tensor,
    pub(crate) exp_avg_sq: Tensor,
    /// Steps this tensor took (torch counts per parameter; one without a gradient does not step).
    pub(crate) step: u64,
}

/// Dtype the update is computed in: f64 for f64 variables, f32 otherwise.
pub(crate) fn compute_dtype(var_dtype: DType) -> DType {
    if var_dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

impl ParamState {
    pub(crate) fn new(name: String, var: Var, moments: MomentDType) -> Result<Self> {
        let vd = var.dtype();
        let cd = compute_dtype(vd);
        let master = if vd == cd {
            None
        } else {
            Some(var.as_tensor().detach().to_dtype(cd)?)
        };
        let md = moments.dtype(cd);
        let exp_avg = Tensor::zeros(var.shape(), md, var.device())?;
        let exp_avg_sq = exp_avg.zeros_like()?;
        Ok(ParamState {
            name,
            var,
            master,
            exp_avg,
            exp_avg_sq,
            step: 0,
        })
    }

    /// The weights the update applies to, in the compute dtype.
    pub(crate) fn weights(&self) -> Tensor {
        self.master
            .clone()
            .unwrap_or_else(|| self.var.as_tensor().detach())
    }
}

/// AdamW over named `Var`s of any float dtype.
#[derive(Debug)]
pub struct AdamW {
    pub(crate) cfg: AdamWConfig,
    pub(crate) params: Vec<ParamState>,
    pub(crate) steps: u64,
}

impl AdamW {
    /// An optimizer for `params` (name, variable); names must be unique (they key saved state).
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        cfg.validate()?;
        let mut seen = std::collections::HashSet::new();
        let mut states = Vec::with_capacity(params.len());
        for (name, var) in params {
            if !seen.insert(name.clone()) {
                return Err(Error::config(
                    "params",
                    format!("duplicate parameter name `{name}`"),
                ));
            }
            states.push(ParamState::new(name, var, cfg.moments)?);
        }
        Ok(AdamW {
            cfg,
            params: states,
            steps: 0,
        })
    }

    /// The hyper-parameters in use.
    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// Number of `step` calls so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Parameter names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.params.iter().map(|p| p.name.as_str())
    }

    /// The variables, in order (cheap clones sharing storage).
    pub fn vars(&self) -> Vec<Var> {
        self.params.iter().map(|p| p.var.clone()).collect()
    }

    /// The full-precision weights of `name` (its master copy, or the variable if it is f32).
    pub fn master(&self, name: &str) -> Option<Tensor> {
        self.params
            .iter()
            .find(|p| p.name == name)
            .map(ParamState::weights)
    }

    fn step_one(cfg: &AdamWConfig, p: &mut ParamState, grad: &Tensor) -> Result<()> {
        let cd = compute_dtype(p.var.dtype());
        let g = grad.detach().to_dtype(cd)?;
        let t = p.step + 1;
        // torch order: decay the weights, update the moments, then the bias-corrected step.
        let mut theta = p.weights();
        if cfg.weight_decay != 0.0 {
            theta = (theta * (1.0 - cfg.lr * cfg.weight_decay))?;
        }
        let m = p.exp_avg.to_dtype(cd)?;
        let v = p.exp_avg_sq.to_dtype(cd)?;
        // exp_avg.lerp_(grad, 1 − β1): m + (1 − β1)(g − m).
        let m = (&m + ((&g - &m)? * (1.0 - cfg.beta1))?)?;
        // exp_avg_sq.mul_(β2).addcmul_(g, g, value = 1 − β2).
        let v = ((v * cfg.beta2)? + (g.sqr()? * (1.0 - cfg.beta2))?)?;
        let bias1 = 1.0 - cfg.beta1.powi(t as i32);
        let bias2_sqrt = (1.0 - cfg.beta2.powi(t as i32)).sqrt();
        let step_size = cfg.lr / bias1;
        let denom = ((v.sqrt()? / bias2_sqrt)? + cfg.eps)?;
        let theta = (theta - ((&m / &denom)? * step_size)?)?;

        let md = cfg.moments.dtype(cd);
        p.exp_avg = m.to_dtype(md)?;
        p.exp_avg_sq = v.to_dtype(md)?;
        if p.master.is_some() {
            p.var.set(&theta.to_dtype(p.var.dtype())?)?;
            p.master = Some(theta);
        } else {
            p.var.set(&theta)?;
        }
        p.step = t;
        Ok(())
    }
}

impl Optimizer for AdamW {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let cfg = self.cfg;
        for p in &mut self.params {
            // Like torch, a parameter without a gradient is left alone (its step count too).
            if let Some(g) = grads.get(p.var.as_tensor()) {
                Self::step_one(&cfg, p, g)?;
            }
        }
        self.steps += 1;
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.cfg.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn grads_for(var: &Var, g: &[f32]) -> Result<GradStore> {
        let mut store = GradStore::default();
        let t = Tensor::new(g, var.device())?.to_dtype(var.dtype())?;
        store.insert(var.as_tensor(), t);
        Ok(store)
    }

    /// Two steps by hand, torch.optim.AdamW formulas in f64:
    /// p0 = 1, lr = 0.1, β = (0.9, 0.999), eps = 1e-8, wd = 0.01, grads 0.5 then −0.25.
    /// Step 1: p = 1·(1 − 0.001) = 0.999; m = 0.05; v = 0.00025; bc1 = 0.1, bc2 = 0.001;
    ///   p −= (0.1/0.1)·0.05 / (sqrt(0.00025)/sqrt(0.001) + 1e-8) = 0.05/0.50000001
    ///   → p = 0.899000002.
    /// Step 2: p = 0.899000002·0.999; m = 0.05 + 0.1·(−0.25 − 0.05) = 0.02;
    ///   v = 0.00024975 + 0.0000625 = 0.00031225; bc1 = 0.19, bc2 = 0.001999;
    ///   p −= (0.1/0.19)·0.02 / (sqrt(0.00031225)/sqrt(0.001999) + 1e-8) → p = 0.8714672987058.
    fn expected_two_steps() -> (f64, f64) {
        let (lr, b1, b2, eps, wd) = (0.1f64, 0.9f64, 0.999f64, 1e-8f64, 0.01f64);
        let mut p = 1.0f64;
        let (mut m, mut v) = (0.0f64, 0.0f64);
        let mut after = [0.0; 2];
        for (i, g) in [0.5f64, -0.25].into_iter().enumerate() {
            let t = (i + 1) as i32;
            p *= 1.0 - lr * wd;
            m += (1.0 - b1) * (g - m);
            v = v * b2 + (1.0 - b2) * g * g;
            let denom = v.sqrt() / (1.0 - b2.powi(t)).sqrt() + eps;
            p -= lr / (1.0 - b1.powi(t)) * m / denom;
            after[i] = p;
        }
        (after[0], after[1])
    }

    #[test]
    fn hand_computed_constants_are_what_the_comment_says() {
        let (p1, p2) = expected_two_steps();
        assert!((p1 - 0.899_000_002).abs() < 1e-15, "{p1}");
        assert!((p2 - 0.871_467_298_705_846).abs() < 1e-14, "{p2}");
    }

    #[test]
    fn two_steps_match_torch_adamw_by_hand() -> Result<()> {
        let dev = Device::Cpu;
        let var = Var::new(&[1.0f32], &dev)?;
        let cfg = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.01,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![("w".into(), var.clone())], cfg)?;
        let (p1, p2) = expected_two_steps();
        opt.step(&grads_for(&var, &[0.5])?)?;
        let got1 = f64::from(var.as_tensor().to_vec1::<f32>()?[0]);
        assert!((got1 - p1).abs() < 1e-7, "{got1} vs {p1}");
        opt.step(&grads_for(&var, &[-0.25])?)?;
        let got2 = f64::from(var.as_tensor().to_vec1::<f32>()?[0]);
        assert!((got2 - p2).abs() < 1e-7, "{got2} vs {p2}");
        assert_eq!(opt.steps(), 2);
        Ok(())
    }

    #[test]
    fn f64_variables_match_to_double_precision() -> Result<()> {
        let dev = Device::Cpu;
        let var = Var::new(&[1.0f64], &dev)?;
        let cfg = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.01,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![("w".into(), var.clone())], cfg)?;
        let (_, p2) = expected_two_steps();
        for g in [0.5, -0.25] {
            let mut store = GradStore::default();
            store.insert(var.as_tensor(), Tensor::new(&[g], &dev)?);
            opt.step(&store)?;
        }
        let got = var.as_tensor().to_vec1::<f64>()?[0];
        assert!((got - p2).abs() < 1e-14, "{got} vs {p2}");
        Ok(())
    }

    #[test]
    fn parameter_without_gradient_is_untouched() -> Result<()> {
        let dev = Device::Cpu;
        let a = Var::new(&[1.0f32], &dev)?;
        let b = Var::new(&[2.0f32], &dev)?;
        let cfg = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.5,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![("a".into(), a.clone()), ("b".into(), b.clone())], cfg)?;
        opt.step(&grads_for(&a, &[1.0])?)?;
        assert_eq!(b.as_tensor().to_vec1::<f32>()?, vec![2.0]);
        assert_ne!(a.as_tensor().to_vec1::<f32>()?, vec![1.0]);
        Ok(())
    }

    /// Constant gradient 1: the bias-corrected moments are exactly 1, so every Adam step is
    /// lr / (1 + eps) ≈ lr. Returns (master, bf16 weight as f32) after `steps` steps.
    fn run_bf16(steps: usize, moments: MomentDType) -> Result<(f32, f32)> {
        let dev = Device::Cpu;
        let var = Var::from_tensor(&Tensor::new(&[1e-2f32], &dev)?.to_dtype(DType::BF16)?)?;
        let cfg = AdamWConfig {
            lr: 5e-7,
            moments,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![("w".into(), var.clone())], cfg)?;
        for _ in 0..steps {
            opt.step(&grads_for(&var, &[1.0])?)?;
        }
        let master = opt.master("w").expect("master").to_vec1::<f32>()?[0];
        let weight = var.as_tensor().to_dtype(DType::F32)?.to_vec1::<f32>()?[0];
        Ok((master, weight))
    }

    #[test]
    fn bf16_weight_learns_at_lr_5e_7_through_the_master() -> Result<()> {
        let start = 164.0f32 / 16384.0; // 1e-2 in bf16: 164 · 2^-14
        // bf16 spacing at 1e-2 is 2^-14 ≈ 6.1e-5: the first steps leave the bf16 weight alone.
        let (m10, w10) = run_bf16(10, MomentDType::F32)?;
        // f32 rounding of the master: at most half an f32 spacing (4.7e-10) per step.
        assert!(
            (f64::from(start - m10) - 10.0 * 5e-7).abs() < 1e-8,
            "master {m10}"
        );
        assert_eq!(w10, start, "10 steps are far below half a bf16 spacing");
        // After 300 steps the master moved 1.5e-4 (2.5 spacings) and the bf16 weight followed.
        let (m300, w300) = run_bf16(300, MomentDType::F32)?;
        assert!(
            (f64::from(start - m300) - 300.0 * 5e-7).abs() < 1.5e-7,
            "master {m300}"
        );
        assert!(w300 < start, "bf16 weight did not move: {w300}");
        let rounded = Tensor::new(&[m300], &Device::Cpu)?
            .to_dtype(DType::BF16)?
            .to_dtype(DType::F32)?;
        assert_eq!(
            w300,
            rounded.to_vec1::<f32>()?[0],
            "weight is the master rounded to bf16"
        );
        // bf16 moments round m and v (by up to a few per cent here), not the weights: the master
        // still moves by about 300 lr and the bf16 weight follows.
        let (mb, wb) = run_bf16(300, MomentDType::Bf16)?;
        let moved = f64::from(start - mb) / (300.0 * 5e-7);
        assert!(
            (0.9..1.1).contains(&moved),
            "master {mb} moved {moved} of 300 lr"
        );
        assert!(
            wb < start,
            "bf16 weight did not move with bf16 moments: {wb}"
        );
        Ok(())
    }

    #[test]
    fn naive_bf16_adamw_does_not_move_the_weight() -> Result<()> {
        // candle-nn's AdamW updates the bf16 tensor itself: 300 steps of 5e-7 round away.
        use candle_nn::optim::{AdamW as NaiveAdamW, Optimizer as _, ParamsAdamW};
        let dev = Device::Cpu;
        let var = Var::from_tensor(&Tensor::new(&[1e-2f32], &dev)?.to_dtype(DType::BF16)?)?;
        let before = var.as_tensor().to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let params = ParamsAdamW {
            lr: 5e-7,
            weight_decay: 0.0,
            ..Default::default()
        };
        let mut naive = NaiveAdamW::new(vec![var.clone()], params)?;
        for _ in 0..300 {
            naive.step(&grads_for(&var, &[1.0])?)?;
        }
        assert_eq!(
            var.as_tensor().to_dtype(DType::F32)?.to_vec1::<f32>()?,
            before
        );
        Ok(())
    }

    #[test]
    fn duplicate_names_and_bad_settings_are_rejected() -> Result<()> {
        let dev = Device::Cpu;
        let v = Var::new(&[1.0f32], &dev)?;
        let dup = AdamW::new(
            vec![("w".into(), v.clone()), ("w".into(), v.clone())],
            AdamWConfig::default(),
        );
        assert!(matches!(
            dup,
            Err(Error::Config {
                field: "params",
                ..
            })
        ));
        let bad = AdamW::new(
            vec![("w".into(), v)],
            AdamWConfig {
                beta2: 1.0,
                ..Default::default()
            },
        );
        assert!(matches!(bad, Err(Error::Config { field: "beta2", .. })));
        Ok(())
    }
}
