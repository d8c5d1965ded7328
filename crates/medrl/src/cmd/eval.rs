//! `medrl eval`: greedy Acc@1 and unbiased Pass@k of a model on VQA records (eval kit prompt,
//! sampling and answer parsing), or the same outputs recomputed from a saved samples file.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use medrl_eval::report::SupportThresholds;
use medrl_eval::{EvalConfig, EvalFile, evaluate, read_samples, rejudge, write_outputs};
use medrl_model::pipeline::Vlm;

use crate::runtime::DeviceArgs;

/// The eval kit's pixel bounds (`inference.py`: 1280·28·28 to 16384·28·28).
const KIT_PIXELS: (usize, usize) = (1280 * 28 * 28, 16384 * 28 * 28);

/// Arguments of `medrl eval`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model directory in the Hugging Face layout; evaluates the records of `--data` (or the config's `data`).
    #[arg(long, conflicts_with = "samples")]
    pub model: Option<PathBuf>,
    /// VQA records (JSONL). With `--samples`, the saved completions are re-judged against them.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Recompute metrics, report and plots from this samples file, without a model.
    #[arg(long, required_unless_present_any = ["model", "print_config"])]
    pub samples: Option<PathBuf>,
    /// Output folder [default: `eval` with --model, the samples file's folder with --samples].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Eval config (YAML, e.g. `configs/eval/medvlthinker-six.yaml`): `description`, `data`,
    /// `datasets` and the run config's `eval:` section (a file of only that section's keys works
    /// too); the flags below override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Print the resolved settings (config file, then flags) as JSON and exit.
    #[arg(long)]
    pub print_config: bool,
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

/// Keys of an [`EvalFile`]; a config file with none of them holds the `eval:` section alone.
const FILE_KEYS: [&str; 4] = ["description", "data", "datasets", "eval"];

/// Reads an eval config strictly: an unknown or mistyped key is an error naming it and the file.
fn load_eval_file(path: &Path) -> Result<EvalFile> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading eval config {}", path.display()))?;
    let parse = || -> Result<EvalFile> {
        let value: yaml_serde::Value = yaml_serde::from_str(&text)?;
        if value.is_null() {
            return Ok(EvalFile::default());
        }
        // Through serde_path_to_error so a wrong type names its key, as run configs do.
        let named = |e: serde_path_to_error::Error<yaml_serde::Error>| anyhow!("field `{}`: {}", e.path(), e.inner());
        if value.as_mapping().is_some_and(|m| FILE_KEYS.iter().any(|k| m.contains_key(*k))) {
            serde_path_to_error::deserialize(value).map_err(named)
        } else {
            Ok(EvalFile { eval: serde_path_to_error::deserialize(value).map_err(named)?, ..EvalFile::default() })
        }
    };
    parse().with_context(|| format!("eval config {}", path.display()))
}

impl Args {
    /// The config file (or the defaults) with the flags applied on top.
    fn eval_file(&self) -> Result<EvalFile> {
        let mut file = match &self.config {
            Some(path) => load_eval_file(path)?,
            None => EvalFile::default(),
        };
        if self.data.is_some() {
            file.data.clone_from(&self.data);
        }
        file.eval = self.eval_config(file.eval)?;
        Ok(file)
    }

    /// `c` with the flags applied on top.
    fn eval_config(&self, mut c: EvalConfig) -> Result<EvalConfig> {
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
    let file = a.eval_file()?;
    if a.print_config {
        println!("{}", serde_json::to_string_pretty(&file)?);
        return Ok(());
    }
    let (items, out) = match (&a.model, &a.samples) {
        (Some(model), _) => {
            let data = file.data.as_deref().context("--model needs --data FILE, or a --config whose `data` names the records")?;
            let config = &file.eval;
            let out = a.out.clone().unwrap_or_else(|| PathBuf::from("eval"));
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let records = medrl_eval::read_records(data)?;
            for missing in file.missing_datasets(&records) {
                tracing::warn!("{} has no record of dataset {missing:?}, which the eval config expects", data.display());
            }
            let base = data.parent().unwrap_or(Path::new("."));
            let vlm = Vlm::load_for_inference(model, a.runtime.dtype()?, &a.runtime.device()?).with_context(|| format!("loading model {}", model.display()))?;
            let items = evaluate(&vlm, &records, base, config, &out.join("samples.jsonl"))?;
            (items, out)
        }
        (None, Some(samples)) => {
            let mut items = read_samples(samples)?;
            let out = a.out.clone().unwrap_or_else(|| samples.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf());
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            // Only an explicit --data re-judges: a config's `data` names what a model run evaluates.
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
