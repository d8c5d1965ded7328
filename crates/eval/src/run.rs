//! Evaluation with a model: for each record the eval kit's prompt, one greedy completion (Acc@1)
//! and n sampled ones (Pass@k), judged by the kit's cascade and appended to the samples file.
//! Finished items are skipped, so an interrupted run resumes where it stopped.

use std::collections::HashSet;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use medrl_model::generate::{GenerationParams, Sampling};
use medrl_model::image::ImageProcessor;
use medrl_model::pipeline::{EncodedPrompt, Vlm};
use medrl_vqa::{PromptTemplate, VqaRecord};
use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};
use crate::judge::{item_for, judge};
use crate::metrics::write_file;
use crate::samples::{ItemSamples, SamplesWriter};

/// Settings of an evaluation run; defaults are the MedBridgeRL eval kit's (paper-recipe.md §7.3)
/// where the kit has one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalConfig {
    /// Sampled completions per item (n); the kit's K = 16.
    pub num_samples: usize,
    /// Sampling temperature; kit 0.7.
    pub temperature: f64,
    /// Nucleus mass; kit 0.9.
    pub top_p: f64,
    /// Top-k cut-off, 0 = off; kit off.
    pub top_k: usize,
    /// Token budget per completion; kit 2048.
    pub max_new_tokens: usize,
    /// Base seed; kit 123. Chunk c of the record list samples with seed + c.
    pub seed: u64,
    /// Records per generation call (their prompts are batched, samples decode together).
    pub batch_size: usize,
    /// Overrides the model's `min_pixels`; the kit uses 1,003,520 (1280·28·28), which upsamples
    /// small images (paper-recipe.md §7.3). `None` keeps the model directory's setting.
    pub min_pixels: Option<usize>,
    /// Overrides the model's `max_pixels`; the kit uses 12,845,056 (16384·28·28).
    pub max_pixels: Option<usize>,
    /// Evaluate only the first this many records.
    pub limit: Option<usize>,
    /// The prompt; the kit's by default, the training template to evaluate a run on its own terms.
    pub template: PromptTemplate,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            num_samples: 16,
            temperature: 0.7,
            top_p: 0.9,
            top_k: 0,
            max_new_tokens: 2048,
            seed: 123,
            batch_size: 8,
            min_pixels: None,
            max_pixels: None,
            limit: None,
            template: PromptTemplate::EvalKit,
        }
    }
}

impl EvalConfig {
    /// Checks every setting.
    pub fn validate(&self) -> Result<()> {
        if self.num_samples == 0 {
            return Err(EvalError::config("num_samples", "expected at least 1 (Pass@k needs samples)"));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(EvalError::config("temperature", format!("expected > 0, got {}", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(EvalError::config("top_p", format!("expected a value in (0, 1], got {}", self.top_p)));
        }
        if self.max_new_tokens == 0 {
            return Err(EvalError::config("max_new_tokens", "expected at least 1"));
        }
        if self.batch_size == 0 {
            return Err(EvalError::config("batch_size", "expected at least 1"));
        }
        if let (Some(lo), Some(hi)) = (self.min_pixels, self.max_pixels)
            && lo > hi
        {
            return Err(EvalError::config("min_pixels", format!("{lo} is above max_pixels {hi}")));
        }
        Ok(())
    }

    /// The settings that decide what a completion is; a resumed run must keep them.
    fn generation_key(&self) -> serde_json::Value {
        serde_json::json!({
            "num_samples": self.num_samples,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_new_tokens": self.max_new_tokens,
            "seed": self.seed,
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "template": self.template.name(),
        })
    }
}

/// Name of the file beside the samples that records the generation settings.
pub const RUN_SETTINGS_FILE: &str = "eval_settings.json";

/// Refuses to append to a samples file made with other generation settings, since mixing them
/// would make every metric meaningless; records the settings for the next run otherwise.
fn check_settings(dir: &Path, config: &EvalConfig, model: &Path) -> Result<()> {
    let path = dir.join(RUN_SETTINGS_FILE);
    let key = config.generation_key();
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let old: serde_json::Value = serde_json::from_str(&text).map_err(|e| EvalError::Line { path: path.clone(), line: e.line(), problem: e.to_string() })?;
            if old.get("generation") != Some(&key) {
                return Err(EvalError::Data(format!(
                    "{} was written with generation settings {} but this run uses {key}: use another --out folder, or delete it to start over",
                    path.display(),
                    old.get("generation").map_or_else(|| "(none)".to_owned(), ToString::to_string),
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let value = serde_json::json!({"generation": key, "model": model.display().to_string(), "template": config.template.name()});
            write_file(&path, &format!("{value:#}\n"))
        }
        Err(e) => Err(EvalError::io(path, e)),
    }
}

/// A progress bar on stderr, hidden when stderr is not a terminal (logs, CI, tests).
pub fn progress_bar(len: u64, message: &'static str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template("{msg} {wide_bar} {pos}/{len} [{elapsed_precise}, eta {eta}]") {
        bar.set_style(style);
    }
    bar.set_message(message);
    bar
}

/// Evaluates `records` (their images resolved against `base`), appending to `samples_path`.
///
/// Returns the items of the samples file that belong to `records`, finished earlier or now,
/// in record order.
pub fn evaluate(vlm: &Vlm, records: &[VqaRecord], base: &Path, config: &EvalConfig, samples_path: &Path) -> Result<Vec<ItemSamples>> {
    config.validate()?;
    let records = &records[..config.limit.map_or(records.len(), |l| l.min(records.len()))];
    let mut seen = HashSet::new();
    for r in records {
        if !seen.insert(r.id.as_str()) {
            return Err(EvalError::Data(format!("record id {:?} appears twice in the data file; ids must be unique", r.id)));
        }
    }
    let dir = samples_path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    check_settings(dir, config, &vlm.dir)?;
    let (mut writer, done) = SamplesWriter::open(samples_path)?;
    let done_ids: HashSet<String> = done.iter().map(|i| i.id.clone()).collect();
    let extra = done.iter().filter(|i| !seen.contains(i.id.as_str())).count();
    if extra > 0 {
        tracing::warn!("{}: {extra} items are not among this run's records and are left out of its metrics", samples_path.display());
    }
    let finished = records.iter().filter(|r| done_ids.contains(&r.id)).count();
    tracing::info!("{} records: {finished} already in {}, {} to evaluate", records.len(), samples_path.display(), records.len() - finished);
    let processor = image_processor(vlm, config)?;
    let bar = progress_bar(records.len() as u64, "eval");
    bar.set_position(finished as u64);
    for (chunk_index, chunk) in records.chunks(config.batch_size).enumerate() {
        let pending: Vec<&VqaRecord> = chunk.iter().filter(|r| !done_ids.contains(&r.id)).collect();
        if pending.is_empty() {
            continue;
        }
        for item in evaluate_batch(vlm, &processor, &pending, base, config, chunk_index as u64)? {
            writer.append(&item)?;
            bar.inc(1);
        }
        writer.sync()?;
    }
    bar.finish_and_clear();
    drop(writer);
    let all = crate::samples::read_samples(samples_path)?;
    let mut by_id: std::collections::HashMap<String, ItemSamples> = all.into_iter().map(|i| (i.id.clone(), i)).collect();
    records
        .iter()
        .map(|r| by_id.remove(&r.id).ok_or_else(|| EvalError::Data(format!("item {:?} is missing from {} after evaluation", r.id, samples_path.display()))))
        .collect()
}

/// The model's image processor with the run's pixel bounds.
fn image_processor(vlm: &Vlm, config: &EvalConfig) -> Result<ImageProcessor> {
    let mut processor = vlm.images.clone();
    if let Some(lo) = config.min_pixels {
        processor.config.min_pixels = lo;
    }
    if let Some(hi) = config.max_pixels {
        processor.config.max_pixels = hi;
    }
    processor.config.validate(&PathBuf::from("eval config (min_pixels / max_pixels)"))?;
    Ok(processor)
}

/// Greedy and sampled completions for a batch of records, judged.
fn evaluate_batch(
    vlm: &Vlm,
    processor: &ImageProcessor,
    records: &[&VqaRecord],
    base: &Path,
    config: &EvalConfig,
    chunk_index: u64,
) -> Result<Vec<ItemSamples>> {
    let prompts = records.iter().map(|r| encode(vlm, processor, r, base, config.template)).collect::<Result<Vec<EncodedPrompt>>>()?;
    let greedy = GenerationParams { sampling: Sampling::Greedy, max_new_tokens: config.max_new_tokens, seed: config.seed };
    let sampled = GenerationParams {
        sampling: Sampling::Random { temperature: config.temperature, top_p: config.top_p, top_k: config.top_k },
        max_new_tokens: config.max_new_tokens,
        // Seeds follow the chunk's place in the record list, not the batch actually run, so a
        // resumed run draws what an uninterrupted one would have.
        seed: config.seed.wrapping_add(chunk_index),
    };
    let greedy_out = vlm.generate(&prompts, 1, &greedy)?;
    let sampled_out = vlm.generate(&prompts, config.num_samples, &sampled)?;
    records
        .iter()
        .zip(greedy_out.into_iter().zip(sampled_out))
        .map(|(record, (g, s))| {
            let greedy_text = g.into_iter().next().map(|t| t.text).ok_or_else(|| EvalError::Data(format!("no greedy completion for {:?}", record.id)))?;
            let samples = s.into_iter().map(|t| judge(t.text, record)).collect();
            Ok(item_for(record, judge(greedy_text, record), samples))
        })
        .collect()
}

/// The configured template's prompt for one record: images first, then the text.
fn encode(vlm: &Vlm, processor: &ImageProcessor, record: &VqaRecord, base: &Path, template: PromptTemplate) -> Result<EncodedPrompt> {
    let prompt = template.build(&record.question, &record.options);
    let images = record
        .image_paths(base)
        .iter()
        .map(|p| processor.process_path(p))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| EvalError::Data(format!("record {:?}: {e}", record.id)))?;
    Ok(vlm.user_prompt(prompt.system.as_deref(), images, &prompt.user)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_kit_and_unknown_keys_fail() -> std::result::Result<(), serde_json::Error> {
        let c: EvalConfig = serde_json::from_str("{}")?;
        assert_eq!((c.num_samples, c.temperature, c.top_p, c.top_k, c.max_new_tokens, c.seed), (16, 0.7, 0.9, 0, 2048, 123));
        assert!(serde_json::from_str::<EvalConfig>(r#"{"num_sample": 4}"#).is_err());
        let c: EvalConfig = serde_json::from_str(r#"{"num_samples": 4, "min_pixels": 3136}"#)?;
        assert_eq!((c.num_samples, c.min_pixels), (4, Some(3136)));
        Ok(())
    }

    #[test]
    fn validate_rejects_unusable_settings() {
        for bad in [
            EvalConfig { num_samples: 0, ..EvalConfig::default() },
            EvalConfig { temperature: 0.0, ..EvalConfig::default() },
            EvalConfig { top_p: 1.5, ..EvalConfig::default() },
            EvalConfig { batch_size: 0, ..EvalConfig::default() },
            EvalConfig { min_pixels: Some(10), max_pixels: Some(5), ..EvalConfig::default() },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        assert!(EvalConfig::default().validate().is_ok());
    }
}
