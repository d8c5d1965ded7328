//! The trainable policy: a model whose selected weights are `Var`s (everything, everything but the
//! vision tower, or LoRA adapters on a frozen base), and its export as merged HF weights.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use medrl_model::config::Config;
use medrl_model::model::Qwen25Vl;
use medrl_model::nn::Lora;
use medrl_model::weights::Weights;
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::config::{LearnerConfig, Trainable};
use crate::Result;

/// One LoRA adapter: the module it adapts and its two matrices.
pub struct Adapter {
    pub module: String,
    pub a: Var,
    pub b: Var,
    pub scale: f64,
}

/// The variables the optimizer owns and the base weights of the model being trained.
pub struct Policy {
    /// Trainable variables by name (HF names; `<module>.lora_A.weight` / `lora_B` for adapters).
    pub params: Vec<(String, Var)>,
    pub adapters: Vec<Adapter>,
    /// Every base weight by name (the `Var` tensors for trainable ones).
    base: Weights,
}

impl Policy {
    /// Loads `dir` and makes the weights selected by `cfg.trainable` trainable; returns the model
    /// built on those variables and the policy that owns them.
    pub fn load(dir: &Path, cfg: &LearnerConfig, dtype: DType, device: &Device) -> Result<(Qwen25Vl, Self)> {
        let config = Config::load(dir)?;
        let loaded = Weights::load(dir, &config, dtype, device)?;
        Self::from_weights(config, loaded, cfg, dtype, device)
    }

    /// Like [`Self::load`], from weights already in memory.
    pub fn from_weights(config: Config, loaded: Weights, cfg: &LearnerConfig, dtype: DType, device: &Device) -> Result<(Qwen25Vl, Self)> {
        let mut params = Vec::new();
        let mut base = Weights::default();
        for (name, t) in loaded.iter() {
            let train = match cfg.trainable {
                Trainable::All => true,
                Trainable::NoVision => !name.starts_with("visual."),
                Trainable::Lora => false,
            };
            if train {
                let v = Var::from_tensor(t)?;
                base.insert(name.clone(), v.as_tensor().clone());
                params.push((name.clone(), v));
            } else {
                base.insert(name.clone(), t.clone());
            }
        }
        let mut model = Qwen25Vl::new(config, &base, dtype, device)?;
        let mut adapters = Vec::new();
        if cfg.trainable == Trainable::Lora {
            let mut rng = StdRng::seed_from_u64(cfg.lora.seed);
            let scale = cfg.lora.alpha / cfg.lora.rank as f64;
            for (module, lin) in model.linears_mut()? {
                let wanted = module.starts_with("model.") && cfg.lora.targets.iter().any(|t| module.rsplit('.').next() == Some(t.as_str()));
                if !wanted {
                    continue;
                }
                let (out, inp) = lin.weight.dims2()?;
                // PEFT's init: kaiming-uniform A (bound 1/sqrt(in)), zero B, so training starts at the base model.
                let bound = 1.0 / (inp as f64).sqrt();
                let a_data: Vec<f32> = (0..cfg.lora.rank * inp).map(|_| rng.random_range(-bound..bound) as f32).collect();
                let a = Var::from_tensor(&Tensor::from_vec(a_data, (cfg.lora.rank, inp), device)?)?;
                let b = Var::from_tensor(&Tensor::zeros((out, cfg.lora.rank), DType::F32, device)?)?;
                lin.lora = Some(Lora { a: a.as_tensor().clone(), b: b.as_tensor().clone(), scale });
                params.push((format!("{module}.lora_A.weight"), a.clone()));
                params.push((format!("{module}.lora_B.weight"), b.clone()));
                adapters.push(Adapter { module, a, b, scale });
            }
        }
        Ok((model, Policy { params, adapters, base }))
    }

    /// The trainable variables.
    pub fn vars(&self) -> Vec<Var> {
        self.params.iter().map(|(_, v)| v.clone()).collect()
    }

    /// Current weights with every adapter merged into its base weight (what a checkpoint or a
    /// weight broadcast carries), detached from the graph.
    pub fn merged_weights(&self) -> Result<Weights> {
        let mut out = Weights::default();
        for (name, t) in self.base.iter() {
            out.insert(name.clone(), t.detach());
        }
        for ad in &self.adapters {
            let name = format!("{}.weight", ad.module);
            let w = self.base.get(&name)?;
            let delta = (ad.b.as_tensor().matmul(ad.a.as_tensor())? * ad.scale)?.to_dtype(w.dtype())?;
            out.insert(name, (w.detach() + delta)?);
        }
        Ok(out)
    }

    /// The adapters alone, for resuming a LoRA run.
    pub fn adapter_tensors(&self) -> Vec<(String, Tensor)> {
        self.params.iter().filter(|(n, _)| n.contains(".lora_")).map(|(n, v)| (n.clone(), v.as_tensor().detach())).collect()
    }
}
