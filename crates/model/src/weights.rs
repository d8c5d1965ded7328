//! Hugging Face safetensors in and out: single or sharded files, both key-name styles, any stored
//! float dtype, shapes checked against the config. In memory every tensor carries the legacy name
//! (`visual.*`, `model.*`, `lm_head.*`), which is also what transformers' `save_pretrained` writes.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::config::Config;
use crate::{Error, Result};

/// Named model tensors with legacy HF names.
#[derive(Debug, Clone, Default)]
pub struct Weights {
    tensors: BTreeMap<String, Tensor>,
    /// Where each tensor came from, for error messages.
    origin: HashMap<String, PathBuf>,
}

/// Maps a stored key to its legacy name: `model.visual.X` -> `visual.X`,
/// `model.language_model.X` -> `model.X`; legacy keys are unchanged.
pub fn legacy_name(key: &str) -> String {
    if let Some(rest) = key.strip_prefix("model.visual.") {
        format!("visual.{rest}")
    } else if let Some(rest) = key.strip_prefix("model.language_model.") {
        format!("model.{rest}")
    } else {
        key.to_string()
    }
}

/// Every tensor a model of this config has, with its shape, in the legacy naming.
pub fn expected_shapes(config: &Config) -> Vec<(String, Vec<usize>)> {
    let v = &config.vision;
    let t = &config.text;
    let mut out = vec![("visual.patch_embed.proj.weight".to_string(), vec![v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size])];
    for i in 0..v.depth {
        let p = format!("visual.blocks.{i}");
        out.push((format!("{p}.norm1.weight"), vec![v.hidden_size]));
        out.push((format!("{p}.norm2.weight"), vec![v.hidden_size]));
        out.push((format!("{p}.attn.qkv.weight"), vec![3 * v.hidden_size, v.hidden_size]));
        out.push((format!("{p}.attn.qkv.bias"), vec![3 * v.hidden_size]));
        out.push((format!("{p}.attn.proj.weight"), vec![v.hidden_size, v.hidden_size]));
        out.push((format!("{p}.attn.proj.bias"), vec![v.hidden_size]));
        for name in ["gate_proj", "up_proj"] {
            out.push((format!("{p}.mlp.{name}.weight"), vec![v.intermediate_size, v.hidden_size]));
            out.push((format!("{p}.mlp.{name}.bias"), vec![v.intermediate_size]));
        }
        out.push((format!("{p}.mlp.down_proj.weight"), vec![v.hidden_size, v.intermediate_size]));
        out.push((format!("{p}.mlp.down_proj.bias"), vec![v.hidden_size]));
    }
    let merged = v.hidden_size * v.merge_unit();
    out.push(("visual.merger.ln_q.weight".into(), vec![v.hidden_size]));
    out.push(("visual.merger.mlp.0.weight".into(), vec![merged, merged]));
    out.push(("visual.merger.mlp.0.bias".into(), vec![merged]));
    out.push(("visual.merger.mlp.2.weight".into(), vec![v.out_hidden_size, merged]));
    out.push(("visual.merger.mlp.2.bias".into(), vec![v.out_hidden_size]));

    let q = t.num_attention_heads * t.head_dim;
    let kv = t.num_key_value_heads * t.head_dim;
    out.push(("model.embed_tokens.weight".into(), vec![t.vocab_size, t.hidden_size]));
    for i in 0..t.num_hidden_layers {
        let p = format!("model.layers.{i}");
        out.push((format!("{p}.input_layernorm.weight"), vec![t.hidden_size]));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![t.hidden_size]));
        out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, t.hidden_size]));
        out.push((format!("{p}.self_attn.q_proj.bias"), vec![q]));
        out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, t.hidden_size]));
        out.push((format!("{p}.self_attn.k_proj.bias"), vec![kv]));
        out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, t.hidden_size]));
        out.push((format!("{p}.self_attn.v_proj.bias"), vec![kv]));
        out.push((format!("{p}.self_attn.o_proj.weight"), vec![t.hidden_size, q]));
        out.push((format!("{p}.mlp.gate_proj.weight"), vec![t.intermediate_size, t.hidden_size]));
        out.push((format!("{p}.mlp.up_proj.weight"), vec![t.intermediate_size, t.hidden_size]));
        out.push((format!("{p}.mlp.down_proj.weight"), vec![t.hidden_size, t.intermediate_size]));
    }
    out.push(("model.norm.weight".into(), vec![t.hidden_size]));
    if !config.tie_word_embeddings {
        out.push(("lm_head.weight".into(), vec![t.vocab_size, t.hidden_size]));
    }
    out
}

/// The safetensors files of a model directory: the shards of an index, or one file.
pub fn weight_files(model_dir: &Path) -> Result<Vec<PathBuf>> {
    let index = model_dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json { path: index.clone(), cause: source })?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::config(&index, "weight_map", "missing; expected an object of tensor name -> shard file"))?;
        let mut files: Vec<PathBuf> = Vec::new();
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| Error::config(&index, format!("weight_map.{name}"), "expected a file name"))?;
            let path = model_dir.join(file);
            if !files.contains(&path) {
                files.push(path);
            }
        }
        files.sort();
        return Ok(files);
    }
    let single = model_dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(model_dir)
        .map_err(|e| Error::io(model_dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::io(single, std::io::Error::new(std::io::ErrorKind::NotFound, "no model.safetensors, no model.safetensors.index.json and no *.safetensors file")));
    }
    Ok(files)
}

impl Weights {
    /// Loads every weight file of `model_dir`, converting floats to `dtype` on `device`, and checks
    /// that the tensors match `config`.
    pub fn load(model_dir: &Path, config: &Config, dtype: DType, device: &Device) -> Result<Self> {
        let mut weights = Weights::default();
        for file in weight_files(model_dir)? {
            weights.load_file(&file, dtype, device)?;
        }
        weights.check(config, model_dir)?;
        Ok(weights)
    }

    fn load_file(&mut self, file: &Path, dtype: DType, device: &Device) -> Result<()> {
        let bytes = std::fs::read(file).map_err(|e| Error::io(file, e))?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| Error::Weights {
            path: file.to_path_buf(),
            name: "(file)".into(),
            problem: format!("not a readable safetensors file: {e}"),
        })?;
        for (key, tensor) in tensors {
            if !matches!(tensor.dtype(), DType::F32 | DType::F16 | DType::BF16 | DType::F64) {
                return Err(Error::Weights { path: file.to_path_buf(), name: key, problem: format!("stored as {:?}; expected a float dtype", tensor.dtype()) });
            }
            let name = legacy_name(&key);
            let tensor = tensor.to_dtype(dtype)?.to_device(device)?;
            self.origin.insert(name.clone(), file.to_path_buf());
            self.tensors.insert(name, tensor);
        }
        Ok(())
    }

    fn check(&mut self, config: &Config, model_dir: &Path) -> Result<()> {
        let expected = expected_shapes(config);
        for (name, shape) in expected.iter().cloned() {
            let where_ = || self.origin.get(&name).cloned().unwrap_or_else(|| model_dir.to_path_buf());
            match self.tensors.get(&name) {
                None => return Err(Error::Weights { path: model_dir.to_path_buf(), name, problem: "missing from every weight file".into() }),
                Some(t) if t.dims() != shape.as_slice() => {
                    return Err(Error::Weights { path: where_(), name: name.clone(), problem: format!("shape {:?}, expected {:?} from config.json", t.dims(), shape) });
                }
                Some(_) => {}
            }
        }
        // Tied models may still store lm_head; it is the embedding then and is dropped.
        if config.tie_word_embeddings {
            self.tensors.remove("lm_head.weight");
        }
        let known: std::collections::HashSet<String> = expected.into_iter().map(|(n, _)| n).collect();
        let extra: Vec<String> = self.tensors.keys().filter(|k| !known.contains(*k)).cloned().collect();
        if !extra.is_empty() {
            tracing::warn!(count = extra.len(), first = %extra[0], "ignoring tensors that Qwen2.5-VL does not use");
            for k in extra {
                self.tensors.remove(&k);
            }
        }
        Ok(())
    }

    /// Wraps tensors that already carry legacy names.
    pub fn from_tensors(tensors: impl IntoIterator<Item = (String, Tensor)>) -> Self {
        Weights { tensors: tensors.into_iter().map(|(k, v)| (legacy_name(&k), v)).collect(), origin: HashMap::new() }
    }

    /// Random weights for `config` (normal with std 0.02, norms at one, biases at zero), seeded.
    /// On a GPU the draws come from the device's own generator, so they differ from the CPU's.
    pub fn random(config: &Config, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        let mut rng = StdRng::seed_from_u64(seed);
        if !device.is_cpu() {
            // A 7B model's 8.3 G host-side normal draws take minutes; the device draws them at once.
            device.set_seed(seed)?;
        }
        let mut tensors = BTreeMap::new();
        for (name, shape) in expected_shapes(config) {
            let n: usize = shape.iter().product();
            // Every RMSNorm weight (norm1/norm2, *_layernorm, model.norm, merger ln_q) starts at one.
            let is_norm = name.ends_with("norm.weight") || name.ends_with("norm1.weight") || name.ends_with("norm2.weight") || name.ends_with("ln_q.weight");
            let tensor = if is_norm {
                Tensor::ones(shape, dtype, device)?
            } else if name.ends_with(".bias") {
                Tensor::zeros(shape, dtype, device)?
            } else if device.is_cpu() {
                Tensor::from_vec((0..n).map(|_| standard_normal(&mut rng) * 0.02).collect::<Vec<f32>>(), shape, device)?.to_dtype(dtype)?
            } else {
                Tensor::randn(0f32, 0.02, shape, device)?.to_dtype(dtype)?
            };
            tensors.insert(name, tensor);
        }
        Ok(Weights { tensors, origin: HashMap::new() })
    }

    /// The same tensors in `dtype` on `device`.
    pub fn to(&self, dtype: DType, device: &Device) -> Result<Self> {
        let tensors = self.tensors.iter().map(|(k, t)| Ok((k.clone(), t.to_device(device)?.to_dtype(dtype)?))).collect::<Result<_>>()?;
        Ok(Weights { tensors, origin: self.origin.clone() })
    }

    /// The tensor called `name` (legacy naming).
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| Error::Weights { path: PathBuf::from("(in memory)"), name: name.into(), problem: "missing".into() })
    }

    /// Replaces or adds one tensor.
    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) {
        self.tensors.insert(name.into(), tensor);
    }

    /// All tensors by legacy name, sorted.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Tensor)> {
        self.tensors.iter()
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// True when there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Total number of scalar parameters.
    pub fn num_parameters(&self) -> usize {
        self.tensors.values().map(|t| t.elem_count()).sum()
    }

    /// Writes the tensors in `dtype` as `model.safetensors`, or as shards of at most `max_shard_bytes`
    /// with `model.safetensors.index.json`; each file is written to a temporary name and renamed.
    pub fn save(&self, model_dir: &Path, dtype: DType, max_shard_bytes: usize) -> Result<()> {
        std::fs::create_dir_all(model_dir).map_err(|e| Error::io(model_dir, e))?;
        let mut shards: Vec<Vec<(&String, &Tensor)>> = vec![Vec::new()];
        let mut current = 0usize;
        for (name, tensor) in &self.tensors {
            let bytes = tensor.elem_count() * dtype.size_in_bytes();
            if current > 0 && current + bytes > max_shard_bytes {
                shards.push(Vec::new());
                current = 0;
            }
            current += bytes;
            if let Some(last) = shards.last_mut() {
                last.push((name, tensor));
            }
        }
        let n = shards.len();
        let mut weight_map = serde_json::Map::new();
        let mut total = 0usize;
        for (i, shard) in shards.iter().enumerate() {
            let file = if n == 1 { "model.safetensors".to_string() } else { format!("model-{:05}-of-{:05}.safetensors", i + 1, n) };
            let mut map = HashMap::new();
            for (name, tensor) in shard {
                let t = tensor.to_dtype(dtype)?.to_device(&Device::Cpu)?.contiguous()?;
                total += t.elem_count() * dtype.size_in_bytes();
                weight_map.insert((*name).clone(), serde_json::Value::String(file.clone()));
                map.insert((*name).clone(), t);
            }
            let path = model_dir.join(&file);
            let tmp = model_dir.join(format!(".{file}.tmp"));
            candle_core::safetensors::save(&map, &tmp).map_err(|e| Error::Weights { path: path.clone(), name: "(file)".into(), problem: format!("write failed: {e}") })?;
            std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        }
        let index_path = model_dir.join("model.safetensors.index.json");
        if n > 1 {
            let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
            write_atomic(&index_path, serde_json::to_string_pretty(&index).unwrap_or_default().as_bytes())?;
        } else if index_path.exists() {
            std::fs::remove_file(&index_path).map_err(|e| Error::io(&index_path, e))?;
        }
        Ok(())
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, so readers never see half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn standard_normal(rng: &mut StdRng) -> f32 {
    // Box-Muller: rand 0.9 has no normal distribution without rand_distr.
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_key_styles_map_to_legacy_names() {
        assert_eq!(legacy_name("model.visual.blocks.0.norm1.weight"), "visual.blocks.0.norm1.weight");
        assert_eq!(legacy_name("model.language_model.layers.1.mlp.up_proj.weight"), "model.layers.1.mlp.up_proj.weight");
        assert_eq!(legacy_name("model.layers.1.mlp.up_proj.weight"), "model.layers.1.mlp.up_proj.weight");
        assert_eq!(legacy_name("visual.merger.mlp.0.bias"), "visual.merger.mlp.0.bias");
        assert_eq!(legacy_name("lm_head.weight"), "lm_head.weight");
    }

    fn tiny_config() -> Config {
        let dir = tempfile::tempdir().expect("tempdir");
        crate::tiny::create_tiny(dir.path(), &crate::tiny::TinySpec::default()).expect("tiny model")
    }

    #[test]
    fn sharded_bf16_save_loads_back_in_both_key_styles() -> Result<()> {
        let config = tiny_config();
        let w = Weights::random(&config, 1, DType::F32, &Device::Cpu)?;
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        w.save(dir.path(), DType::BF16, 200_000)?;
        assert!(dir.path().join("model.safetensors.index.json").exists());
        assert!(weight_files(dir.path())?.len() > 1, "small shards give several files");
        let back = Weights::load(dir.path(), &config, DType::F32, &Device::Cpu)?;
        assert_eq!(back.len(), w.len());
        for (name, t) in w.iter() {
            let want = t.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
            let diff = (back.get(name)? - want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "{name} changed in the round trip");
        }
        // The same tensors under the new key style load to the same names.
        let renamed: HashMap<String, Tensor> = w
            .iter()
            .map(|(k, t)| {
                let key = if let Some(r) = k.strip_prefix("visual.") { format!("model.visual.{r}") } else if let Some(r) = k.strip_prefix("model.") { format!("model.language_model.{r}") } else { k.clone() };
                (key, t.clone())
            })
            .collect();
        let dir2 = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        candle_core::safetensors::save(&renamed, dir2.path().join("model.safetensors"))?;
        let back = Weights::load(dir2.path(), &config, DType::F32, &Device::Cpu)?;
        assert_eq!(back.len(), w.len());
        Ok(())
    }

    #[test]
    fn missing_and_misshaped_tensors_are_named() -> Result<()> {
        let config = tiny_config();
        let w = Weights::random(&config, 1, DType::F32, &Device::Cpu)?;
        let mut map: HashMap<String, Tensor> = w.iter().map(|(k, t)| (k.clone(), t.clone())).collect();
        map.remove("model.norm.weight");
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        candle_core::safetensors::save(&map, dir.path().join("model.safetensors"))?;
        let msg = Weights::load(dir.path(), &config, DType::F32, &Device::Cpu).expect_err("missing").to_string();
        assert!(msg.contains("model.norm.weight") && msg.contains("missing"), "{msg}");
        map.insert("model.norm.weight".into(), Tensor::zeros(3, DType::F32, &Device::Cpu)?);
        candle_core::safetensors::save(&map, dir.path().join("model.safetensors"))?;
        let msg = Weights::load(dir.path(), &config, DType::F32, &Device::Cpu).expect_err("shape").to_string();
        assert!(msg.contains("model.safetensors") && msg.contains("model.norm.weight") && msg.contains("shape"), "{msg}");
        Ok(())
    }
}
