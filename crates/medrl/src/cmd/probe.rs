//! `medrl probe`: linear or kNN probe of a model's frozen vision tower on labelled images (an
//! image folder with one subfolder per class, or a MedMNIST npz).

use std::path::PathBuf;

use anyhow::{Context, Result};
use medrl_eval::{Pooling, ProbeConfig, ProbeData, ProbeMethod, Vote, run_probe};
use medrl_model::image::ImageProcessor;
use medrl_model::model::Qwen25Vl;

use crate::runtime::DeviceArgs;

/// Arguments of `medrl probe`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model directory in the Hugging Face layout (only its vision tower is used).
    #[arg(long)]
    pub model: PathBuf,
    /// Image folder (`CLASS/*.png`, or `train/CLASS/*` with `val/` or `test/`) or MedMNIST `.npz`.
    #[arg(long)]
    pub data: PathBuf,
    /// `linear` or `knn`.
    #[arg(long, default_value = "linear")]
    pub method: ProbeMethod,
    /// Token pooling: `mean` or `max`.
    #[arg(long, default_value = "mean")]
    pub pooling: Pooling,
    /// JSON file of probe settings (ProbeConfig keys); the flags below override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Output folder for probe.json.
    #[arg(long, default_value = "probe")]
    pub out: PathBuf,
    /// Linear probe epochs [default: 20].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Linear probe peak learning rate [default: 0.1].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Linear probe batch size [default: 1024].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Train the linear probe on fixed centre-crop features instead of fresh augmented views.
    #[arg(long)]
    pub no_augment: bool,
    /// kNN neighbours [default: 20].
    #[arg(long)]
    pub k: Option<usize>,
    /// kNN vote: `majority` or `weighted` [default: majority].
    #[arg(long)]
    pub vote: Option<Vote>,
    /// kNN on features pooled as the paper's knn.py reshapes them (quarter-width rows).
    #[arg(long)]
    pub kit_knn_fold: bool,
    /// Crop side [default: 224].
    #[arg(long)]
    pub image_size: Option<u32>,
    /// Shorter side before the evaluation centre crop [default: 256].
    #[arg(long)]
    pub resize_size: Option<u32>,
    /// Images per vision-tower call [default: 32].
    #[arg(long)]
    pub extract_batch: Option<usize>,
    /// Held-out share per class when the folder has no train/val split [default: 0.2].
    #[arg(long)]
    pub val_fraction: Option<f64>,
    /// Seed of split, initialisation, shuffling and augmentation [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Feature cache folder [default: $XDG_CACHE_HOME/medrl/features or ~/.cache/medrl/features].
    #[arg(long, conflicts_with = "no_cache")]
    pub cache_dir: Option<PathBuf>,
    /// Do not read or write the feature cache.
    #[arg(long)]
    pub no_cache: bool,
    #[command(flatten)]
    pub runtime: DeviceArgs,
}

/// The user's cache folder for features.
fn default_cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("medrl").join("features")
}

impl Args {
    /// The config file's settings with the flags applied on top.
    fn probe_config(&self) -> Result<ProbeConfig> {
        let mut c = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                serde_json::from_str(&text).with_context(|| format!("{}: not a probe config", path.display()))?
            }
            None => ProbeConfig::default(),
        };
        c.method = self.method;
        c.pooling = self.pooling;
        macro_rules! set {
            ($($flag:ident => $($field:ident).+),*) => {$( if let Some(v) = self.$flag { c.$($field).+ = v; } )*};
        }
        set!(epochs => linear.epochs, lr => linear.lr, batch_size => linear.batch_size, k => k, vote => vote,
             image_size => image_size, resize_size => resize_size, extract_batch => extract_batch,
             val_fraction => val_fraction, seed => seed);
        if let Some(seed) = self.seed {
            c.linear.seed = seed;
        }
        if self.no_augment {
            c.augment = false;
        }
        if self.kit_knn_fold {
            c.kit_knn_fold = true;
        }
        c.cache_dir = if self.no_cache { None } else { Some(self.cache_dir.clone().or(c.cache_dir).unwrap_or_else(default_cache_dir)) };
        c.validate()?;
        Ok(c)
    }
}

/// Loads the model's vision tower, runs the probe, prints and writes the result.
pub fn run(a: Args) -> Result<()> {
    let config = a.probe_config()?;
    let data = ProbeData::load(&a.data, config.val_fraction, config.seed)?;
    tracing::info!("{}: {} classes, {} train / {} eval images", data.origin, data.classes.len(), data.train.len(), data.test.len());
    let model = Qwen25Vl::load(&a.model, a.runtime.dtype()?, &a.runtime.device()?).with_context(|| format!("loading model {}", a.model.display()))?;
    let processor = ImageProcessor::load(&a.model)?;
    let report = run_probe(&model, processor, &a.model, &data, &config)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let path = a.out.join("probe.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n").with_context(|| format!("writing {}", path.display()))?;
    println!("{}", report.summary());
    println!("wrote {}", path.display());
    Ok(())
}
