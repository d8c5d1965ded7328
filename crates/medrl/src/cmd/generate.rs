//! `medrl generate`: sample completions for one chat prompt.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use medrl_model::generate::{GenerationParams, Sampling};
use medrl_model::pipeline::Vlm;

use crate::runtime::DeviceArgs;

/// Arguments of `medrl generate`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model directory in the Hugging Face layout.
    #[arg(long)]
    pub model: PathBuf,
    /// Image file; repeat for several images (they come first in the user turn).
    #[arg(long = "image")]
    pub images: Vec<PathBuf>,
    /// User text.
    #[arg(long)]
    pub prompt: String,
    /// Optional system message (the chat template's default otherwise).
    #[arg(long)]
    pub system: Option<String>,
    /// Always take the most likely token.
    #[arg(long, conflicts_with_all = ["temperature", "top_p", "top_k"])]
    pub greedy: bool,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// 0 turns top-k off.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1)]
    pub num_samples: usize,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// One JSON object per sample per line: {"text", "token_ids", "logprobs"}.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub runtime: DeviceArgs,
}

/// Loads the model, samples and prints.
pub fn run(a: Args) -> Result<()> {
    if a.num_samples == 0 || a.max_new_tokens == 0 {
        bail!("--num-samples and --max-new-tokens must be at least 1");
    }
    if !a.greedy && (a.temperature <= 0.0 || !(a.top_p > 0.0 && a.top_p <= 1.0)) {
        bail!("--temperature must be > 0 and --top-p in (0, 1]; use --greedy for deterministic decoding");
    }
    let vlm = Vlm::load_for_inference(&a.model, a.runtime.dtype()?, &a.runtime.device()?).with_context(|| format!("loading model {}", a.model.display()))?;
    let images = vlm.load_images(&a.images)?;
    let prompt = vlm.user_prompt(a.system.as_deref(), images, &a.prompt)?;
    let sampling = if a.greedy { Sampling::Greedy } else { Sampling::Random { temperature: a.temperature, top_p: a.top_p, top_k: a.top_k } };
    let params = GenerationParams { sampling, max_new_tokens: a.max_new_tokens, seed: a.seed };
    let outs = vlm.generate(std::slice::from_ref(&prompt), a.num_samples, &params)?;
    let many = a.num_samples > 1;
    for (i, sample) in outs.into_iter().flatten().enumerate() {
        if many && !a.json {
            println!("--- sample {i} ---");
        }
        if a.json {
            let line = serde_json::json!({"text": sample.text, "token_ids": sample.completion.token_ids, "logprobs": sample.completion.logprobs});
            println!("{line}");
        } else {
            println!("{}", sample.text);
        }
    }
    Ok(())
}
