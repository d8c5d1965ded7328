//! `medrl eval`: greedy Acc@1 and unbiased Pass@k of a model on VQA records (eval kit prompt,
//! sampling and answer parsing), or the same outputs recomputed from a saved samples file.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use medrl_eval::report::SupportThresholds;
use medrl_eval::{EvalConfig, evaluate, read_samples, rejudge, write_outputs};
use medrl_model::pipeline::Vlm;

use crate::runtime::DeviceArgs;

/// The eval kit's pixel bounds (`inference.py`: 1280·28·28 to 16384·28·28).
const KIT_PIXELS: (usize, usize) = (1280 * 28 * 28, 16384 * 28 * 28);

/// Arguments of `medrl eval`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model directory in the Hugging Face layout; evaluates the records of `--data`.
    #[arg(long, conflicts_with = "samples", requires = "data")]
    pub model: Option<PathBuf>,
    /// VQA records (JSONL). With `--samples`, the saved completions are re-judged against them.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Recompute metrics, report and plots from this samples file, without a model.
    #[arg(long, required_unless_present = "model")]
    pub samples: Option<PathBuf>,
    /// Output folder [default: `eval` with --model, the samples file's folder with --samples].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// JSON file of evaluation settings (EvalConfig keys); the flags below override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Sampled completions per item [default: 16].
    #[arg(long)]
    pub num_samples: Option<usize>,
    /// Sampling temperature [default: 0.7].
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Nucleus mass [default: 0.9].
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Top-k cut-off, 0 = off [default: 0].
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Token budget per completion [default: 2048].
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Base seed [default: 123].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Records per generation call [default: 8].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Override the model's min_pixels.
    #[arg(long)]
    pub min_pixels: Option<usize>,
    /// Override the model's max_pixels.
    #[arg(long)]
    pub max_pixels: Option<usize>,
    /// Use the eval kit's pixel bounds (1,003,520 to 12,845,056; upsamples small images).
    #[arg(long, conflicts_with_all = ["min_pixels", "max_pixels"])]
    pub kit_pixels: bool,
    /// Evaluate only the first N records.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Pass@K below this fraction counts as low support in the report.
    #[arg(long, default_value_t = SupportThresholds::default().low_support)]
    pub low_support: f64,
    /// Pass@K − Acc@1 at or above this fraction counts as a gap RL can close.
    #[arg(long, default_value_t = SupportThresholds::default().min_gap)]
    pub min_gap: f64,
    #[command(flatten)]
    pub runtime: DeviceArgs,
}

impl Args {
    /// The config file's settings with the flags applied on top.
    fn eval_config(&self) -> Result<EvalConfig> {
        let mut c = match &self.config {
            Some(path) => EvalConfig::from_file(path)?,
            None => EvalConfig::default(),
        };
        macro_rules! set {
            ($($field:ident),*) => {$( if let Some(v) = self.$field { c.$field = v; } )*};
        }
        set!(num_samples, temperature, top_p, top_k, max_new_tokens, seed, batch_size);
        if self.min_pixels.is_some() {
            c.min_pixels = self.min_pixels;
        }
        if self.max_pixels.is_some() {
            c.max_pixels = self.max_pixels;
        }
        if self.kit_pixels {
            (c.min_pixels, c.max_pixels) = (Some(KIT_PIXELS.0), Some(KIT_PIXELS.1));
        }
        if self.limit.is_some() {
            c.limit = self.limit;
        }
        c.validate()?;
        Ok(c)
    }
}

/// Runs the evaluation (or the recomputation) and writes every output.
pub fn run(a: Args) -> Result<()> {
    let thresholds = SupportThresholds { low_support: a.low_support, min_gap: a.min_gap, ..SupportThresholds::default() };
    thresholds.validate()?;
    let (items, out) = match (&a.model, &a.samples) {
        (Some(model), _) => {
            let data = a.data.as_deref().context("--model needs --data")?;
            let config = a.eval_config()?;
            let out = a.out.clone().unwrap_or_else(|| PathBuf::from("eval"));
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let records = medrl_eval::read_records(data)?;
            let base = data.parent().unwrap_or(Path::new("."));
            let vlm = Vlm::load(model, a.runtime.dtype()?, &a.runtime.device()?).with_context(|| format!("loading model {}", model.display()))?;
            let items = evaluate(&vlm, &records, base, &config, &out.join("samples.jsonl"))?;
            (items, out)
        }
        (None, Some(samples)) => {
            let mut items = read_samples(samples)?;
            let out = a.out.clone().unwrap_or_else(|| samples.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf());
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            if let Some(data) = &a.data {
                let changed = rejudge(&mut items, &medrl_eval::read_records(data)?)?;
                let path = out.join("samples.rejudged.jsonl");
                let _ = std::fs::remove_file(&path);
                let (mut w, _) = medrl_eval::SamplesWriter::open(&path)?;
                for item in &items {
                    w.append(item)?;
                }
                tracing::info!("re-judged every completion with the eval kit's cascade: {changed} judgements changed; written to {}", path.display());
            }
            (items, out)
        }
        (None, None) => bail!("give --model DIR --data FILE, or --samples FILE"),
    };
    let outputs = write_outputs(&items, &out, &thresholds)?;
    let o = &outputs.metrics.overall;
    let support = o.support().map_or_else(|| "n/a".to_owned(), |(k, p)| format!("Pass@{k} {:.2}%", 100.0 * p));
    println!(
        "{} items: Acc@1 {:.2}%  {support}  format failures {:.2}%",
        o.items,
        100.0 * o.acc_at_1,
        100.0 * o.format_failure_rate
    );
    for f in &outputs.files {
        println!("wrote {}", f.display());
    }
    Ok(())
}
