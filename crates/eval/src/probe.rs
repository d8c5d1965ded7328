//! `medrl probe`: how separable the frozen vision tower's features are, by a linear probe or a
//! kNN classifier, reported as top-1 / top-5 accuracy on the evaluation split
//! (paper-recipe.md §8).
//!
//! Evaluation images (and, for kNN or without augmentation, training images) go through the
//! deterministic `Resize` + `CenterCrop` view and their features are cached. With augmentation
//! the linear probe sees a fresh random-resized-crop-and-flip view of every training image each
//! epoch, re-extracted through the tower, as `linprobe.py` does (its transform sits in the
//! data loader, in front of the frozen tower).

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use candle_core::Device;
use medrl_model::image::ImageProcessor;
use medrl_model::model::Qwen25Vl;
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use crate::augment::{eval_view, train_view};
use crate::error::{EvalError, Result};
use crate::features::{FeatureExtractor, Pooling};
use crate::knn::{KnnScores, Vote, knn_scores};
use crate::linear::{EpochLog, LinearConfig, train_linear_probe};
use crate::probe_data::{ProbeData, ProbeImage};
use crate::run::progress_bar;

/// Which probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeMethod {
    /// BatchNorm + linear layer trained with SGD.
    #[default]
    Linear,
    /// k nearest neighbours by cosine similarity.
    Knn,
}

impl ProbeMethod {
    /// The method's name in reports.
    pub fn name(self) -> &'static str {
        match self {
            ProbeMethod::Linear => "linear",
            ProbeMethod::Knn => "kNN",
        }
    }
}

impl std::str::FromStr for ProbeMethod {
    type Err = EvalError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "linear" => Ok(ProbeMethod::Linear),
            "knn" => Ok(ProbeMethod::Knn),
            other => Err(EvalError::config("method", format!("expected linear or knn, got {other:?}"))),
        }
    }
}

/// Probe settings; defaults are the paper's scripts' (paper-recipe.md §8).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProbeConfig {
    /// Linear probe or kNN.
    pub method: ProbeMethod,
    /// Token pooling.
    pub pooling: Pooling,
    /// Crop side fed to the image processor; the scripts' 224.
    pub image_size: u32,
    /// Shorter side before the evaluation centre crop; the scripts' 256.
    pub resize_size: u32,
    /// Random resized crop + flip of training images each epoch (linear probe only).
    pub augment: bool,
    /// Optimiser of the linear probe.
    pub linear: LinearConfig,
    /// Neighbours of the kNN probe; the script's 20.
    pub k: usize,
    /// kNN vote.
    pub vote: Vote,
    /// Pool kNN features as `knn.py`'s reshape does (quarter-width rows); see
    /// [`crate::features::pool`].
    pub kit_knn_fold: bool,
    /// Images per vision-tower call.
    pub extract_batch: usize,
    /// Evaluation rows per kNN similarity product; the script's 128.
    pub knn_chunk: usize,
    /// Share of each class held out when the image folder has no train/val split.
    pub val_fraction: f64,
    /// Seed of the split and the augmentation draws.
    pub seed: u64,
    /// Feature cache folder; `None` disables caching.
    pub cache_dir: Option<PathBuf>,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            method: ProbeMethod::Linear,
            pooling: Pooling::Mean,
            image_size: 224,
            resize_size: 256,
            augment: true,
            linear: LinearConfig::default(),
            k: 20,
            vote: Vote::Majority,
            kit_knn_fold: false,
            extract_batch: 32,
            knn_chunk: 128,
            val_fraction: 0.2,
            seed: 0,
            cache_dir: None,
        }
    }
}

impl ProbeConfig {
    /// Checks the settings that no later step checks.
    pub fn validate(&self) -> Result<()> {
        if self.image_size == 0 || self.resize_size < self.image_size {
            return Err(EvalError::config("image_size", format!("need 0 < image_size <= resize_size, got {} and {}", self.image_size, self.resize_size)));
        }
        if self.method == ProbeMethod::Linear && self.linear.epochs == 0 {
            return Err(EvalError::config("epochs", "expected at least 1"));
        }
        if self.kit_knn_fold && self.method != ProbeMethod::Knn {
            return Err(EvalError::config("kit_knn_fold", "only applies to the kNN probe"));
        }
        Ok(())
    }
}

/// The outcome of a probe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeReport {
    /// Which probe ran.
    pub method: ProbeMethod,
    /// Where the images came from.
    pub data: String,
    /// Class names.
    pub classes: Vec<String>,
    /// Training images.
    pub train_images: usize,
    /// Evaluation images.
    pub eval_images: usize,
    /// Feature width.
    pub feature_dim: usize,
    /// Top-1 accuracy on the evaluation split (after the last epoch for the linear probe).
    pub top1: f64,
    /// Top-5 accuracy (top-`classes` when there are fewer than five).
    pub top5: f64,
    /// Per-epoch log of the linear probe.
    pub epochs: Vec<EpochLog>,
    /// kNN details.
    pub knn: Option<KnnScores>,
    /// The settings used.
    pub config: ProbeConfig,
}

impl ProbeReport {
    /// One line for the terminal.
    pub fn summary(&self) -> String {
        format!(
            "{} probe on {} ({} classes, {} train / {} eval images, {}-d features): top-1 {:.2}%  top-5 {:.2}%",
            self.method.name(),
            self.data,
            self.classes.len(),
            self.train_images,
            self.eval_images,
            self.feature_dim,
            100.0 * self.top1,
            100.0 * self.top5
        )
    }
}

/// Accuracy of a probe on given features: the part of [`run_probe`] after feature extraction,
/// with fixed training features (no augmentation).
#[allow(clippy::too_many_arguments)]
pub fn probe_on_features(
    config: &ProbeConfig,
    train: &[Vec<f32>],
    train_labels: &[usize],
    eval: &[Vec<f32>],
    eval_labels: &[usize],
    classes: usize,
    device: &Device,
) -> Result<(f64, f64, Vec<EpochLog>, Option<KnnScores>)> {
    match config.method {
        ProbeMethod::Knn => {
            let s = knn_scores(train, train_labels, eval, eval_labels, classes, config.k, config.vote, config.knn_chunk, device)?;
            Ok((s.top1, s.top5, Vec::new(), Some(s)))
        }
        ProbeMethod::Linear => {
            let (_, logs) = train_linear_probe(|_| Ok(Cow::Borrowed(train)), train_labels, eval, eval_labels, classes, &config.linear)?;
            let last = logs.last().map(|l| l.eval).unwrap_or_default();
            Ok((last.top1, last.top5, logs, None))
        }
    }
}

/// Mixes the seed and the epoch into the epoch's augmentation stream.
fn epoch_seed(seed: u64, epoch: usize) -> u64 {
    seed ^ (epoch as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Runs the configured probe of `model`'s vision tower on `data`.
pub fn run_probe(model: &Qwen25Vl, processor: ImageProcessor, model_dir: &Path, data: &ProbeData, config: &ProbeConfig) -> Result<ProbeReport> {
    config.validate()?;
    let fold = config.method == ProbeMethod::Knn && config.kit_knn_fold;
    let extractor = FeatureExtractor::new(model, processor, model_dir, config.pooling, fold, config.extract_batch, config.cache_dir.clone())?;
    let view = format!("eval_view(resize={},crop={})", config.resize_size, config.image_size);
    let deterministic = |images: &[ProbeImage], what: &'static str| -> Result<Vec<Vec<f32>>> {
        let keys = images.iter().map(|i| data.content_key(i)).collect::<Result<Vec<_>>>()?;
        let bar = progress_bar(images.len() as u64, what);
        let out = extractor.cached(&keys, &view, |i| Ok(eval_view(&data.rgb(&images[i])?, config.resize_size, config.image_size)), |n| bar.inc(n));
        bar.finish_and_clear();
        out
    };
    let labels = |images: &[ProbeImage]| images.iter().map(|i| i.label).collect::<Vec<_>>();
    let (train_y, eval_y) = (labels(&data.train), labels(&data.test));
    let eval_x = deterministic(&data.test, "eval features")?;
    let classes = data.classes.len();
    let (top1, top5, epochs, knn) = if config.method == ProbeMethod::Linear && config.augment {
        let augmented = |epoch: usize| -> Result<Cow<'static, [Vec<f32>]>> {
            let mut rng = StdRng::seed_from_u64(epoch_seed(config.seed, epoch));
            let bar = progress_bar(data.train.len() as u64, "augmented train features");
            let mut out = Vec::with_capacity(data.train.len());
            for chunk in data.train.chunks(config.extract_batch) {
                let views = chunk.iter().map(|i| Ok(train_view(&data.rgb(i)?, config.image_size, &mut rng))).collect::<Result<Vec<_>>>()?;
                out.extend(extractor.extract(&views)?);
                bar.inc(chunk.len() as u64);
            }
            bar.finish_and_clear();
            Ok(Cow::Owned(out))
        };
        let (_, logs) = train_linear_probe(augmented, &train_y, &eval_x, &eval_y, classes, &config.linear)?;
        let last = logs.last().map(|l| l.eval).unwrap_or_default();
        (last.top1, last.top5, logs, None)
    } else {
        let train_x = deterministic(&data.train, "train features")?;
        probe_on_features(config, &train_x, &train_y, &eval_x, &eval_y, classes, model.device())?
    };
    Ok(ProbeReport {
        method: config.method,
        data: data.origin.clone(),
        classes: data.classes.clone(),
        train_images: data.train.len(),
        eval_images: data.test.len(),
        feature_dim: extractor.dim(),
        top1,
        top5,
        epochs,
        knn,
        config: config.clone(),
    })
}
