//! `medrl bench parity`: log-probs of one set of random weights computed on a device and dtype
//! (e.g. `--device cuda --dtype bf16`) against the CPU in f32: the teacher-forced forward in both
//! execution paths, unfused (the learner's) and with fused projections (inference), and the decode
//! path (fused projections, prefix-shared KV cache, on-device sampling and greedy picks) of
//! completions made on the device. Prints one JSON line; exits non-zero when a difference exceeds
//! the tolerance.

use anyhow::{Result, bail};
use candle_core::{DType, Device};
use medrl_model::generate::{GenerationParams, Request, Sampling, generate};
use medrl_model::image::ProcessedImage;
use medrl_model::model::{Qwen25Vl, Sequence};
use medrl_model::nn::Exec;
use medrl_model::weights::Weights;
use rand::{SeedableRng, rngs::StdRng};

use super::bench::{RandomModelArgs, random_tokens, synthetic_prompt};
use crate::runtime::DeviceArgs;

/// Arguments of `medrl bench parity`.
#[derive(clap::Args, Debug)]
pub struct ParityArgs {
    #[command(flatten)]
    pub model: RandomModelArgs,
    #[arg(long, default_value_t = 2)]
    pub sequences: usize,
    /// Prompt text tokens per sequence besides the image.
    #[arg(long, default_value_t = 24)]
    pub prompt_tokens: usize,
    /// Square image side in pixels (multiple of 28); 0 for none.
    #[arg(long, default_value_t = 56)]
    pub image_size: usize,
    /// Completion tokens scored per sequence, and sampled per completion in the decode check.
    #[arg(long, default_value_t = 16)]
    pub completion_tokens: usize,
    /// Largest allowed |log-prob difference| (default: 1e-4 in f32, 0.15 in bf16, 0.05 in f16).
    #[arg(long)]
    pub tolerance: Option<f64>,
    #[command(flatten)]
    pub runtime: DeviceArgs,
}

struct Prompt {
    ids: Vec<u32>,
    images: Vec<ProcessedImage>,
}

/// Largest |a - b| over two equally long lists.
fn max_abs_diff(a: &[f32], b: &[f32]) -> Result<f64> {
    if a.len() != b.len() {
        bail!("{} log-probs against {} reference ones", a.len(), b.len());
    }
    Ok(a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs()).fold(0.0, f64::max))
}

fn span_logprobs(model: &Qwen25Vl, seqs: &[(Vec<u32>, &[ProcessedImage], usize)], exec: Exec) -> Result<Vec<f32>> {
    let batch = model.batch(&seqs.iter().map(|(ids, images, _)| Sequence { ids, images }).collect::<Vec<_>>(), 0)?;
    let spans: Vec<std::ops::Range<usize>> = seqs.iter().map(|(ids, _, start)| *start..ids.len()).collect();
    Ok(model.span_logprobs(&batch, &spans, exec)?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

/// Runs the comparison and prints its report.
pub fn run(a: ParityArgs) -> Result<()> {
    let (dtype, device) = (a.runtime.dtype()?, a.runtime.device()?);
    let tolerance = a.tolerance.unwrap_or(match dtype {
        DType::F32 => 1e-4,
        DType::F16 => 0.05,
        _ => 0.15,
    });
    let config = a.model.config()?;
    let host = Weights::random(&config, 0, DType::F32, &Device::Cpu)?;
    let reference = Qwen25Vl::new(config.clone(), &host, DType::F32, &Device::Cpu)?;
    let mut tested = Qwen25Vl::new(config, &host.to(dtype, &device)?, dtype, &device)?;
    drop(host);

    let mut rng = StdRng::seed_from_u64(1);
    let prompts: Vec<Prompt> = (0..a.sequences.max(1))
        .map(|_| synthetic_prompt(&reference, a.image_size, a.prompt_tokens, &mut rng).map(|(ids, images)| Prompt { ids, images }))
        .collect::<Result<_>>()?;
    let forced: Vec<(Vec<u32>, &[ProcessedImage], usize)> = prompts
        .iter()
        .map(|p| {
            let mut ids = p.ids.clone();
            ids.extend(random_tokens(&reference.config, a.completion_tokens, &mut rng));
            (ids, p.images.as_slice(), p.ids.len())
        })
        .collect();
    let want = span_logprobs(&reference, &forced, Exec::Train)?;
    let train = max_abs_diff(&span_logprobs(&tested, &forced, Exec::Train)?, &want)?;
    let infer = max_abs_diff(&span_logprobs(&tested, &forced, Exec::Infer)?, &want)?;
    // From here on the tested model is the rollout worker's: projections fused.
    tested.fuse_projections()?;
    let infer_fused = max_abs_diff(&span_logprobs(&tested, &forced, Exec::Infer)?, &want)?;

    // The decode path: two sampled completions and a greedy one on the tested device, their
    // tokens scored on the reference.
    let first = &prompts[0];
    let mut sampled = Vec::new();
    let mut decoded = Vec::new();
    for (sampling, num_samples) in [(Sampling::Random { temperature: 1.0, top_p: 1.0, top_k: 0 }, 2), (Sampling::Greedy, 1)] {
        let params = GenerationParams { sampling, max_new_tokens: a.completion_tokens, seed: 3 };
        let request = Request { prompt: &first.ids, images: &first.images, num_samples };
        for c in generate(&tested, &[request], &params, &[], 0)?.into_iter().flatten() {
            sampled.push(([first.ids.as_slice(), &c.token_ids].concat(), first.images.as_slice(), first.ids.len()));
            decoded.extend(c.logprobs);
        }
    }
    let decode = max_abs_diff(&decoded, &span_logprobs(&reference, &sampled, Exec::Train)?)?;
    tested.device().synchronize()?;

    let pass = [train, infer, infer_fused, decode].iter().all(|&d| d <= tolerance);
    let report = serde_json::json!({
        "bench": "parity",
        "device": a.runtime.device,
        "dtype": a.runtime.dtype,
        "layers": tested.config.text.num_hidden_layers,
        "vocab": tested.config.text.vocab_size,
        "scored_tokens": want.len(),
        "decoded_tokens": decoded.len(),
        "train_max_abs_diff": train,
        "infer_max_abs_diff": infer,
        "infer_fused_max_abs_diff": infer_fused,
        "decode_max_abs_diff": decode,
        "tolerance": tolerance,
        "pass": pass,
    });
    println!("{report}");
    if !pass {
        bail!("log-probs on {} {} differ from the CPU f32 reference by more than {tolerance}", a.runtime.device, a.runtime.dtype);
    }
    Ok(())
}
