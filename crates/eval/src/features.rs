//! Frozen vision-tower features: each image's merged tokens (after the 2x2 patch merger) pooled
//! by mean or max, as the paper's probes do (paper-recipe.md §8.1), with an on-disk cache of one
//! safetensors file per image keyed by a hash of the model, the image and the pooling.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::{DynamicImage, RgbImage};
use medrl_model::image::ImageProcessor;
use medrl_model::model::Qwen25Vl;
use medrl_model::nn::Exec;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{EvalError, Result};

/// How an image's merged tokens become one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// Mean over tokens (the paper's default).
    #[default]
    Mean,
    /// Element-wise max over tokens.
    Max,
}

impl std::str::FromStr for Pooling {
    type Err = EvalError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "mean" => Ok(Pooling::Mean),
            "max" => Ok(Pooling::Max),
            other => Err(EvalError::config("pooling", format!("expected mean or max, got {other:?}"))),
        }
    }
}

/// Pools `tokens` rows of `dim` values into one vector.
///
/// With `fold_quarters`, each token is first split into four rows of `dim / 4`, which is what
/// the paper's `knn.py` does by viewing the merged tokens as `(B, prod(grid_thw), -1)` (four
/// times the token count, a quarter of the width) where `linprobe.py` uses `prod / 4` tokens of
/// full width; it exists only to reproduce that script's numbers.
pub fn pool(values: &[f32], dim: usize, pooling: Pooling, fold_quarters: bool) -> Vec<f32> {
    let width = if fold_quarters { dim / 4 } else { dim };
    if width == 0 || values.is_empty() {
        return vec![0.0; width];
    }
    let rows = values.chunks_exact(width);
    let count = rows.len();
    match pooling {
        Pooling::Mean => {
            // Summed in f64: thousands of tokens in f32 lose digits the probes can see.
            let mut acc = vec![0f64; width];
            for row in rows {
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a += f64::from(v);
                }
            }
            acc.into_iter().map(|a| (a / count as f64) as f32).collect()
        }
        Pooling::Max => {
            let mut acc = vec![f32::NEG_INFINITY; width];
            for row in rows {
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a = a.max(v);
                }
            }
            acc
        }
    }
}

/// Runs the frozen vision tower on images and pools its output.
pub struct FeatureExtractor<'a> {
    model: &'a Qwen25Vl,
    processor: ImageProcessor,
    pooling: Pooling,
    fold_quarters: bool,
    /// Images per tower call.
    batch: usize,
    /// Folder of cached features; `None` disables the cache.
    cache: Option<PathBuf>,
    /// Hash of everything but the image that decides a feature.
    key: String,
}

/// What identifies a model directory's weights without reading them all: its path, its config
/// files, and the names, sizes and modification times of its weight files.
pub fn model_fingerprint(dir: &Path) -> Result<String> {
    let mut h = Sha256::new();
    let canonical = dir.canonicalize().map_err(|e| EvalError::io(dir, e))?;
    h.update(canonical.to_string_lossy().as_bytes());
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| EvalError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for path in entries {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name.ends_with(".json") {
            h.update(name.as_bytes());
            h.update(std::fs::read(&path).map_err(|e| EvalError::io(&path, e))?);
        } else if name.ends_with(".safetensors") {
            let meta = std::fs::metadata(&path).map_err(|e| EvalError::io(&path, e))?;
            let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
            h.update(format!("{name}:{}:{mtime}", meta.len()).as_bytes());
        }
    }
    Ok(hex::encode(h.finalize()))
}

impl<'a> FeatureExtractor<'a> {
    /// An extractor for `model` (loaded from `model_dir`) with its image processor.
    pub fn new(
        model: &'a Qwen25Vl,
        processor: ImageProcessor,
        model_dir: &Path,
        pooling: Pooling,
        fold_quarters: bool,
        batch: usize,
        cache: Option<PathBuf>,
    ) -> Result<Self> {
        if batch == 0 {
            return Err(EvalError::config("extract_batch", "expected at least 1"));
        }
        let mut h = Sha256::new();
        h.update(model_fingerprint(model_dir)?.as_bytes());
        h.update(format!("{:?}|{:?}|{fold_quarters}|", model.dtype(), pooling).as_bytes());
        h.update(serde_json::to_string(&processor.config).map_err(|e| EvalError::Data(e.to_string()))?.as_bytes());
        Ok(FeatureExtractor { model, processor, pooling, fold_quarters, batch, cache, key: hex::encode(h.finalize()) })
    }

    /// Width of the pooled features.
    pub fn dim(&self) -> usize {
        let out = self.model.config.vision.out_hidden_size;
        if self.fold_quarters { out / 4 } else { out }
    }

    /// Pooled features of RGB images, `self.batch` images per tower call.
    pub fn extract(&self, images: &[RgbImage]) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(images.len());
        for chunk in images.chunks(self.batch) {
            out.extend(self.extract_batch(chunk)?);
        }
        Ok(out)
    }

    fn extract_batch(&self, images: &[RgbImage]) -> Result<Vec<Vec<f32>>> {
        let device: &Device = self.model.device();
        let dim = self.model.config.vision.patch_dim();
        let merge = self.model.config.vision.spatial_merge_size;
        let mut pixels = Vec::new();
        let mut grids = Vec::with_capacity(images.len());
        let mut tokens = Vec::with_capacity(images.len());
        for (i, img) in images.iter().enumerate() {
            let processed = self.processor.process_image(&DynamicImage::ImageRgb8(img.clone()), &format!("probe image {i}"))?;
            tokens.push(processed.merged_tokens(merge));
            grids.push(processed.grid_thw);
            pixels.extend_from_slice(&processed.pixel_values);
        }
        let rows = pixels.len() / dim.max(1);
        let input = Tensor::from_vec(pixels, (rows, dim), device)?;
        let merged = self.model.vision.forward(&input, &grids, self.model.dtype(), Exec::Infer)?;
        let out_dim = merged.dim(1)?;
        let values = merged.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut at = 0;
        let mut out = Vec::with_capacity(images.len());
        for n in tokens {
            let span = values.get(at * out_dim..(at + n) * out_dim).ok_or_else(|| EvalError::Data("the vision tower returned fewer tokens than the images need".into()))?;
            out.push(pool(span, out_dim, self.pooling, self.fold_quarters));
            at += n;
        }
        Ok(out)
    }

    /// Cache file of the image with content key `image_key` seen through transform `view`.
    fn cache_path(&self, image_key: &str, view: &str) -> Option<PathBuf> {
        let dir = self.cache.as_ref()?;
        let mut h = Sha256::new();
        h.update(self.key.as_bytes());
        h.update(view.as_bytes());
        h.update(image_key.as_bytes());
        let name = hex::encode(h.finalize());
        Some(dir.join(&name[..2]).join(format!("{name}.safetensors")))
    }

    /// Features of images named by content key, read from the cache where present; the rest
    /// are loaded with `load`, extracted in batches and cached. `view` names the deterministic
    /// transform `load` applies, so different views never share entries.
    pub fn cached(&self, keys: &[String], view: &str, load: impl Fn(usize) -> Result<RgbImage>, mut progress: impl FnMut(u64)) -> Result<Vec<Vec<f32>>> {
        let mut out: Vec<Option<Vec<f32>>> = vec![None; keys.len()];
        let mut missing = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            match self.cache_path(key, view).filter(|p| p.is_file()) {
                Some(path) => match read_feature(&path) {
                    Ok(f) if f.len() == self.dim() => {
                        out[i] = Some(f);
                        progress(1);
                    }
                    // A damaged or foreign entry is recomputed rather than trusted.
                    _ => {
                        tracing::warn!("{}: unreadable cache entry, recomputing", path.display());
                        missing.push(i);
                    }
                },
                None => missing.push(i),
            }
        }
        if !missing.is_empty() {
            tracing::info!("extracting {} of {} features ({} cached)", missing.len(), keys.len(), keys.len() - missing.len());
        }
        for chunk in missing.chunks(self.batch) {
            let images = chunk.iter().map(|&i| load(i)).collect::<Result<Vec<_>>>()?;
            for (&i, feature) in chunk.iter().zip(self.extract_batch(&images)?) {
                if let Some(path) = self.cache_path(&keys[i], view) {
                    write_feature(&path, &feature)?;
                }
                out[i] = Some(feature);
                progress(1);
            }
        }
        out.into_iter().enumerate().map(|(i, f)| f.ok_or_else(|| EvalError::Data(format!("feature {i} was not computed")))).collect()
    }
}

/// Reads a cached feature vector.
pub fn read_feature(path: &Path) -> Result<Vec<f32>> {
    let tensors: HashMap<String, Tensor> = candle_core::safetensors::load(path, &Device::Cpu)?;
    let t = tensors.get("feature").ok_or_else(|| EvalError::Data(format!("{}: no `feature` tensor", path.display())))?;
    Ok(t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Writes a feature vector atomically (temporary file, then rename), so concurrent or killed
/// runs never leave half an entry.
pub fn write_feature(path: &Path, feature: &[f32]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| EvalError::io(dir, e))?;
    let tensor = Tensor::from_slice(feature, feature.len(), &Device::Cpu)?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    candle_core::safetensors::save(&HashMap::from([("feature".to_owned(), tensor)]), &tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| EvalError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_mean_max_and_kit_fold() {
        // Two tokens of width 4.
        let v = [1.0, 2.0, 3.0, 4.0, 3.0, 0.0, 5.0, 8.0];
        assert_eq!(pool(&v, 4, Pooling::Mean, false), vec![2.0, 1.0, 4.0, 6.0]);
        assert_eq!(pool(&v, 4, Pooling::Max, false), vec![3.0, 2.0, 5.0, 8.0]);
        // knn.py's view: eight rows of width 1.
        assert_eq!(pool(&v, 4, Pooling::Mean, true), vec![26.0 / 8.0]);
        assert_eq!(pool(&v, 4, Pooling::Max, true), vec![8.0]);
        assert_eq!("max".parse::<Pooling>().ok(), Some(Pooling::Max));
        assert!("sum".parse::<Pooling>().is_err());
    }

    #[test]
    fn feature_files_round_trip() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| EvalError::io("tempdir", e))?;
        let path = dir.path().join("ab").join("x.safetensors");
        write_feature(&path, &[1.5, -2.0, 0.25])?;
        assert_eq!(read_feature(&path)?, vec![1.5, -2.0, 0.25]);
        Ok(())
    }
}
