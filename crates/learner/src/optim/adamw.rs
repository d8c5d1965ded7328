//! AdamW with f32 master weights, matching `torch.optim.AdamW` (single-tensor path).
//!
//! Why masters: at lr 5e-7 an Adam step moves a weight by about 5e-7, while a bf16 weight of
//! magnitude 1e-2 has a spacing of 6e-5; applied to the bf16 weight directly the step rounds
//! away and training silently stops. Here every trainable `Var` has an f32 master copy (the
//! `Var` itself when it is already f32) that accumulates the steps; the `Var` is set from the
//! master, rounded to its dtype, after each step. DeepSpeed's bf16 mode (the paper's stack) does
//! the same.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::optim::host::{AdamWStep, HostState, WeightScratch};
use crate::optim::{Optimizer, Placement};
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

/// Where and how one parameter's state is kept.
#[derive(Debug)]
pub(crate) enum State {
    /// Tensors beside the weights (on a GPU, or f64), updated with candle ops; `master` is
    /// `None` when the variable itself has the compute dtype.
    Tensors { master: Option<Tensor>, exp_avg: Tensor, exp_avg_sq: Tensor },
    /// f32 state in host memory, updated in place on all cores.
    Host(HostState),
}

/// One trainable tensor and its optimizer state.
#[derive(Debug)]
pub(crate) struct ParamState {
    pub(crate) name: String,
    pub(crate) var: Var,
    pub(crate) state: State,
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
    /// Fresh state for `var` on `state_device`: the master starts at the variable, the moments
    /// at zero.
    pub(crate) fn new(name: String, var: Var, moments: MomentDType, state_device: &Device) -> Result<Self> {
        let md = moments.dtype(compute_dtype(var.dtype()));
        // Untouched zero pages on the host: they cost no memory before being copied.
        let zeros = Tensor::zeros(var.shape(), md, state_device)?;
        let master = var.as_tensor().detach();
        Self::restore(name, var, &master, zeros.clone(), zeros, 0, state_device)
    }

    /// State from saved tensors (on any device) for `var`, kept on `state_device`: in host
    /// memory when that is the CPU and the compute dtype is f32.
    pub(crate) fn restore(name: String, var: Var, master: &Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: u64, state_device: &Device) -> Result<Self> {
        let cd = compute_dtype(var.dtype());
        let state = if state_device.is_cpu() && cd == DType::F32 {
            State::Host(HostState::new(master, &exp_avg, &exp_avg_sq, var.dtype())?)
        } else {
            let master = if var.dtype() == cd && var.device().same_device(state_device) {
                None
            } else {
                Some(master.to_dtype(cd)?.to_device(state_device)?)
            };
            let (exp_avg, exp_avg_sq) = (exp_avg.to_device(state_device)?, exp_avg_sq.to_device(state_device)?);
            State::Tensors { master, exp_avg, exp_avg_sq }
        };
        Ok(ParamState { name, var, state, step })
    }

    /// The weights the update applies to, in the compute dtype (a host copy for host state).
    pub(crate) fn weights(&self) -> Result<Tensor> {
        match &self.state {
            State::Tensors { master: Some(m), .. } => Ok(m.clone()),
            State::Tensors { master: None, .. } => Ok(self.var.as_tensor().detach()),
            State::Host(h) => h.master(),
        }
    }

    /// The two moments in their storage dtype (host copies for host state).
    pub(crate) fn moments(&self) -> Result<(Tensor, Tensor)> {
        match &self.state {
            State::Tensors { exp_avg, exp_avg_sq, .. } => Ok((exp_avg.clone(), exp_avg_sq.clone())),
            State::Host(h) => h.moments(),
        }
    }
}

/// AdamW over named `Var`s of any float dtype.
#[derive(Debug)]
pub struct AdamW {
    pub(crate) cfg: AdamWConfig,
    pub(crate) params: Vec<ParamState>,
    pub(crate) steps: u64,
    pub(crate) scratch: WeightScratch,
}

impl AdamW {
    /// An optimizer for `params` (name, variable) with its state beside the weights; names must
    /// be unique (they key saved state).
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        Self::placed(params, cfg, Placement::WithWeights)
    }

    /// An optimizer for `params` with its state where `placement` says.
    pub fn placed(params: Vec<(String, Var)>, cfg: AdamWConfig, placement: Placement) -> Result<Self> {
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
            let state_device = placement.device(var.device());
            states.push(ParamState::new(name, var, cfg.moments, &state_device)?);
        }
        Ok(AdamW {
            cfg,
            params: states,
            steps: 0,
            scratch: WeightScratch::default(),
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
        self.params.iter().find(|p| p.name == name).and_then(|p| p.weights().ok())
    }

    /// One parameter's update: candle ops for state in tensors, the host kernel for host state.
    fn step_one(cfg: &AdamWConfig, p: &mut ParamState, grad: &Tensor, scratch: &mut WeightScratch) -> Result<()> {
        let t = p.step + 1;
        match &mut p.state {
            State::Tensors { master, exp_avg, exp_avg_sq } => {
                let theta = master.clone().unwrap_or_else(|| p.var.as_tensor().detach());
                let (theta, m, v) = Self::update_with_ops(cfg, t, &theta, exp_avg, exp_avg_sq, grad)?;
                (*exp_avg, *exp_avg_sq) = (m, v);
                if master.is_some() {
                    p.var.set(&theta.to_dtype(p.var.dtype())?.to_device(p.var.device())?)?;
                    *master = Some(theta);
                } else {
                    p.var.set(&theta)?;
                }
            }
            State::Host(h) => {
                let weight = h.step(Self::host_scalars(cfg, t), grad, scratch, p.var.device())?;
                p.var.set(&weight)?;
            }
        }
        p.step = t;
        Ok(())
    }

    /// Step `t` of torch's update in candle ops: the new weights (compute dtype) and moments
    /// (their storage dtype).
    fn update_with_ops(cfg: &AdamWConfig, t: u64, theta: &Tensor, exp_avg: &Tensor, exp_avg_sq: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let cd = theta.dtype();
        let g = grad.detach().to_dtype(cd)?.to_device(theta.device())?;
        // torch order: decay the weights, update the moments, then the bias-corrected step.
        let mut theta = theta.clone();
        if cfg.weight_decay != 0.0 {
            theta = (theta * (1.0 - cfg.lr * cfg.weight_decay))?;
        }
        let m = exp_avg.to_dtype(cd)?;
        let v = exp_avg_sq.to_dtype(cd)?;
        // exp_avg.lerp_(grad, 1 − β1): m + (1 − β1)(g − m).
        let m = (&m + ((&g - &m)? * (1.0 - cfg.beta1))?)?;
        // exp_avg_sq.mul_(β2).addcmul_(g, g, value = 1 − β2).
        let v = ((v * cfg.beta2)? + (g.sqr()? * (1.0 - cfg.beta2))?)?;
        let bias1 = 1.0 - cfg.beta1.powi(t as i32);
        let bias2_sqrt = (1.0 - cfg.beta2.powi(t as i32)).sqrt();
        let step_size = cfg.lr / bias1;
        let denom = ((v.sqrt()? / bias2_sqrt)? + cfg.eps)?;
        let theta = (theta - ((&m / &denom)? * step_size)?)?;
        let md = exp_avg.dtype();
        Ok((theta, m.to_dtype(md)?, v.to_dtype(md)?))
    }

    /// Step `t`'s scalars for the host kernel, computed in f64 and rounded once.
    fn host_scalars(cfg: &AdamWConfig, t: u64) -> AdamWStep {
        AdamWStep {
            decay: (1.0 - cfg.lr * cfg.weight_decay) as f32,
            one_minus_beta1: (1.0 - cfg.beta1) as f32,
            beta2: cfg.beta2 as f32,
            one_minus_beta2: (1.0 - cfg.beta2) as f32,
            bias2_sqrt: (1.0 - cfg.beta2.powi(t as i32)).sqrt() as f32,
            eps: cfg.eps as f32,
            step_size: (cfg.lr / (1.0 - cfg.beta1.powi(t as i32))) as f32,
        }
    }
}

impl Optimizer for AdamW {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let cfg = self.cfg;
        for p in &mut self.params {
            // Like torch, a parameter without a gradient is left alone (its step count too).
            if let Some(g) = grads.get(p.var.as_tensor()) {
                Self::step_one(&cfg, p, g, &mut self.scratch)?;
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

    /// The host kernel and the candle-ops update (the one GPU-resident state takes) agree to f32
    /// rounding over several steps, for every weight and moment dtype.
    #[test]
    fn host_kernel_matches_the_candle_ops_update() -> Result<()> {
        let dev = Device::Cpu;
        let n = 70_000; // more than two of the kernel's blocks, the last one partial
        let init: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin() * 0.05).collect();
        for (dtype, moments) in [(DType::F32, MomentDType::F32), (DType::BF16, MomentDType::F32), (DType::BF16, MomentDType::Bf16), (DType::F16, MomentDType::F32)] {
            let cfg = AdamWConfig { lr: 1e-3, weight_decay: 0.1, moments, ..Default::default() };
            let var = || -> Result<Var> { Ok(Var::from_tensor(&Tensor::new(init.as_slice(), &dev)?.to_dtype(dtype)?)?) };
            let mut host = ParamState::new("w".into(), var()?, moments, &dev)?;
            assert!(matches!(host.state, State::Host(_)), "f32 state on the CPU is host state");
            // What a GPU-resident state does, here on the CPU.
            let zeros = Tensor::zeros(n, moments.dtype(DType::F32), &dev)?;
            let master = (dtype != DType::F32).then(|| Tensor::new(init.as_slice(), &dev).and_then(|t| t.to_dtype(dtype)?.to_dtype(DType::F32)));
            let state = State::Tensors { master: master.transpose()?, exp_avg: zeros.clone(), exp_avg_sq: zeros };
            let mut ops = ParamState { name: "w".into(), var: var()?, state, step: 0 };
            let mut scratch = WeightScratch::default();
            for step in 0..3 {
                let g: Vec<f32> = (0..n).map(|i| ((i * (step + 3)) as f32 * 0.011).cos()).collect();
                let g = Tensor::new(g.as_slice(), &dev)?;
                AdamW::step_one(&cfg, &mut host, &g, &mut scratch)?;
                AdamW::step_one(&cfg, &mut ops, &g, &mut scratch)?;
            }
            let flat = |t: Tensor| -> Result<Vec<f32>> { Ok(t.to_dtype(DType::F32)?.to_vec1::<f32>()?) };
            let ((hm, hv), (om, ov)) = (host.moments()?, ops.moments()?);
            let pairs = [
                ("master", host.weights()?, ops.weights()?),
                ("weight", host.var.as_tensor().clone(), ops.var.as_tensor().clone()),
                ("exp_avg", hm, om),
                ("exp_avg_sq", hv, ov),
            ];
            // Three steps of at most lr each: f32 state agrees to rounding; bf16 moments round
            // differently by an ulp (0.4 %), which moves a step by about as much.
            let step_tol = if moments == MomentDType::Bf16 { 3.0 * 1e-3 * 1e-2 } else { 1e-7 };
            let weight_ulp = if dtype == DType::F32 { 0.0 } else { 1.0 / 128.0 }; // one bf16 ulp at most
            let moment_tol = if moments == MomentDType::Bf16 { 1e-2 } else { 1e-5 };
            for (what, a, b) in pairs {
                assert_eq!(a.dtype(), b.dtype(), "{what} {dtype:?}");
                let (a, b) = (flat(a)?, flat(b)?);
                for (x, y) in a.iter().zip(&b) {
                    let tol = match what {
                        "master" => step_tol,
                        "weight" => step_tol + y.abs() * weight_ulp,
                        _ => y.abs() * moment_tol + 1e-12,
                    };
                    assert!((x - y).abs() <= tol, "{what} {dtype:?} {moments:?}: {x} vs {y}");
                }
            }
            assert_eq!((host.step, ops.step), (3, 3));
        }
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
