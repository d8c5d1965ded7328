//! Saving and resuming AdamW: tensors (moments, master weights) in safetensors, everything else
//! (hyper-parameters, step counts, names, shapes, dtypes) in JSON, so that a resumed run takes
//! exactly the steps the uninterrupted one would have taken.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::optim::Placement;
use crate::optim::adamw::{AdamW, AdamWConfig, ParamState, compute_dtype};
use crate::{Error, Result};

/// File name of the tensors inside a state directory.
pub const STATE_TENSORS: &str = "optimizer.safetensors";
/// File name of the JSON metadata inside a state directory.
pub const STATE_JSON: &str = "optimizer.json";
const FORMAT: u32 = 1;

/// Per-parameter metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ParamMeta {
    name: String,
    shape: Vec<usize>,
    dtype: String,
    step: u64,
}

/// The JSON file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct StateMeta {
    format: u32,
    config: AdamWConfig,
    steps: u64,
    params: Vec<ParamMeta>,
}

fn key(kind: &str, name: &str) -> String {
    format!("{kind}/{name}")
}

impl AdamW {
    /// Writes the state to `dir` ([`STATE_TENSORS`] and [`STATE_JSON`]), creating `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        let mut params = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let (exp_avg, exp_avg_sq) = p.moments()?;
            tensors.insert(key("exp_avg", &p.name), exp_avg);
            tensors.insert(key("exp_avg_sq", &p.name), exp_avg_sq);
            // The master is saved even when it is the variable itself, so that resuming does
            // not depend on how the model weights were saved.
            tensors.insert(key("master", &p.name), p.weights()?);
            params.push(ParamMeta {
                name: p.name.clone(),
                shape: p.var.dims().to_vec(),
                dtype: p.var.dtype().as_str().to_string(),
                step: p.step,
            });
        }
        let tensor_path = dir.join(STATE_TENSORS);
        candle_core::safetensors::save(&tensors, &tensor_path)?;
        let meta = StateMeta {
            format: FORMAT,
            config: self.cfg,
            steps: self.steps,
            params,
        };
        let json_path = dir.join(STATE_JSON);
        let text = serde_json::to_string_pretty(&meta).map_err(|source| Error::Json {
            path: json_path.clone(),
            source,
        })?;
        std::fs::write(&json_path, text).map_err(|source| Error::Io {
            path: json_path,
            source,
        })
    }

    /// Rebuilds the optimizer saved in `dir` for `params`, which must have the saved names,
    /// shapes and dtypes in the saved order. Each variable is set from its saved master weights
    /// (rounded to its dtype): the master is the source of truth of a resumed run. The state goes
    /// where `placement` says, whichever placement saved it.
    pub fn load(dir: &Path, params: Vec<(String, Var)>, placement: Placement) -> Result<Self> {
        let json_path = dir.join(STATE_JSON);
        let text = std::fs::read_to_string(&json_path).map_err(|source| Error::Io {
            path: json_path.clone(),
            source,
        })?;
        let meta: StateMeta = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: json_path.clone(),
            source,
        })?;
        let bad = |problem: String| Error::State {
            path: json_path.clone(),
            problem,
        };
        if meta.format != FORMAT {
            return Err(bad(format!(
                "format {} (this build reads {FORMAT})",
                meta.format
            )));
        }
        if meta.params.len() != params.len() {
            return Err(bad(format!(
                "{} parameters saved, {} given",
                meta.params.len(),
                params.len()
            )));
        }
        meta.config.validate()?;
        let device = match params.first() {
            Some((_, v)) => placement.device(v.device()),
            None => candle_core::Device::Cpu,
        };
        let tensor_path = dir.join(STATE_TENSORS);
        let mut tensors = candle_core::safetensors::load(&tensor_path, &device)?;
        let mut states = Vec::with_capacity(params.len());
        for ((name, var), saved) in params.into_iter().zip(&meta.params) {
            if name != saved.name
                || var.dims() != saved.shape.as_slice()
                || var.dtype().as_str() != saved.dtype
            {
                return Err(bad(format!(
                    "parameter `{name}` {:?} {} does not match saved `{}` {:?} {}",
                    var.dims(),
                    var.dtype().as_str(),
                    saved.name,
                    saved.shape,
                    saved.dtype
                )));
            }
            let mut take = |kind: &str| {
                tensors
                    .remove(&key(kind, &name))
                    .ok_or_else(|| Error::State {
                        path: tensor_path.clone(),
                        problem: format!("missing tensor `{}`", key(kind, &name)),
                    })
            };
            let (exp_avg, exp_avg_sq, master) =
                (take("exp_avg")?, take("exp_avg_sq")?, take("master")?);
            let cd = compute_dtype(var.dtype());
            let md = match meta.config.moments {
                crate::optim::MomentDType::F32 => cd,
                crate::optim::MomentDType::Bf16 => DType::BF16,
            };
            for (kind, t, dtype) in [
                ("exp_avg", &exp_avg, md),
                ("exp_avg_sq", &exp_avg_sq, md),
                ("master", &master, cd),
            ] {
                if t.dims() != saved.shape.as_slice() || t.dtype() != dtype {
                    return Err(Error::State {
                        path: tensor_path.clone(),
                        problem: format!(
                            "`{}` is {:?} {:?}, expected {:?} {dtype:?}",
                            key(kind, &name),
                            t.dims(),
                            t.dtype(),
                            saved.shape
                        ),
                    });
                }
            }
            var.set(&master.to_dtype(var.dtype())?.to_device(var.device())?)?;
            states.push(ParamState::restore(name, var, &master, exp_avg, exp_avg_sq, saved.step, &device)?);
        }
        tracing::info!(dir = %dir.display(), steps = meta.steps, "resumed optimizer state");
        Ok(AdamW {
            cfg: meta.config,
            params: states,
            steps: meta.steps,
            scratch: Default::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::{MomentDType, Optimizer};
    use candle_core::Device;
    use candle_core::backprop::GradStore;

    fn params(dev: &Device) -> Result<Vec<(String, Var)>> {
        let a = Var::from_tensor(
            &Tensor::new(&[[0.5f32, -0.25], [1.0, 2.0]], dev)?.to_dtype(DType::BF16)?,
        )?;
        let b = Var::new(&[0.1f32, 0.2, 0.3], dev)?;
        Ok(vec![("layer.a".into(), a), ("layer.b".into(), b)])
    }

    /// A gradient that changes from step to step.
    fn grads(params: &[(String, Var)], step: usize) -> Result<GradStore> {
        let mut s = GradStore::default();
        for (i, (_, v)) in params.iter().enumerate() {
            let g = (v.as_tensor().to_dtype(DType::F32)?.ones_like()?
                * (0.3 * (step + i) as f64 - 0.4))?;
            s.insert(v.as_tensor(), g.to_dtype(v.dtype())?);
        }
        Ok(s)
    }

    fn snapshot(opt: &AdamW) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::new();
        for v in opt.vars() {
            out.push(
                v.as_tensor()
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            );
        }
        for name in ["layer.a", "layer.b"] {
            out.push(
                opt.master(name)
                    .expect("master")
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            );
        }
        Ok(out)
    }

    fn resume_equals_uninterrupted(moments: MomentDType) -> Result<()> {
        let dev = Device::Cpu;
        let cfg = AdamWConfig {
            lr: 1e-3,
            weight_decay: 0.1,
            moments,
            ..Default::default()
        };

        let straight_params = params(&dev)?;
        let mut straight = AdamW::new(straight_params.clone(), cfg)?;
        for step in 0..3 {
            straight.step(&grads(&straight_params, step)?)?;
        }

        let first_params = params(&dev)?;
        let mut first = AdamW::new(first_params.clone(), cfg)?;
        for step in 0..2 {
            first.step(&grads(&first_params, step)?)?;
        }
        let dir = tempfile::tempdir().map_err(|source| Error::Io {
            path: "tempdir".into(),
            source,
        })?;
        first.save(dir.path())?;
        drop(first);

        // Fresh variables with their initial values: loading must restore the trained ones.
        let resumed_params = params(&dev)?;
        let mut resumed = AdamW::load(dir.path(), resumed_params.clone(), Placement::WithWeights)?;
        assert_eq!(resumed.steps(), 2);
        resumed.step(&grads(&resumed_params, 2)?)?;

        assert_eq!(snapshot(&resumed)?, snapshot(&straight)?);
        assert_eq!(resumed.steps(), 3);
        Ok(())
    }

    #[test]
    fn two_steps_save_load_one_step_equals_three_steps() -> Result<()> {
        resume_equals_uninterrupted(MomentDType::F32)
    }

    #[test]
    fn resume_is_exact_with_bf16_moments_too() -> Result<()> {
        resume_equals_uninterrupted(MomentDType::Bf16)
    }

    #[test]
    fn loading_for_different_parameters_is_an_error() -> Result<()> {
        let dev = Device::Cpu;
        let p = params(&dev)?;
        let opt = AdamW::new(p, AdamWConfig::default())?;
        let dir = tempfile::tempdir().map_err(|source| Error::Io {
            path: "tempdir".into(),
            source,
        })?;
        opt.save(dir.path())?;
        let mut renamed = params(&dev)?;
        renamed[1].0 = "other".into();
        assert!(matches!(
            AdamW::load(dir.path(), renamed, Placement::WithWeights),
            Err(Error::State { .. })
        ));
        let fewer = params(&dev)?.into_iter().take(1).collect();
        assert!(matches!(
            AdamW::load(dir.path(), fewer, Placement::WithWeights),
            Err(Error::State { .. })
        ));
        Ok(())
    }
}
