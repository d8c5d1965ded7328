//! `medrl bench`: speed of the model on a real directory or on random weights of any config.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use medrl_model::config::Config;
use medrl_model::decoder::KvCache;
use medrl_model::generate::{GenerationParams, Request, Sampling, generate};
use medrl_model::image::ProcessedImage;
use medrl_model::model::{Qwen25Vl, Sequence};
use medrl_model::nn::Exec;
use medrl_model::tiny::{TinySpec, create_tiny};
use medrl_model::weights::Weights;
use candle_core::Tensor;
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::runtime::DeviceArgs;

/// Which benchmark to run.
#[derive(clap::Subcommand, Debug)]
pub enum Bench {
    /// Rollout: prefill each prompt once, then sample K completions per prompt.
    Rollout(RolloutArgs),
    /// Learner: forward + backward of the GRPO loss over a batch of sequences, then AdamW.
    Learner(LearnerArgs),
    /// Weight sync: the gRPC chunk stream's throughput on loopback (publish, fetch, checksum).
    WeightSync(WeightSyncArgs),
    /// Coordinator: leases/s and lease latency under simulated workers on loopback.
    Coordinator(super::bench_coordinator::CoordinatorArgs),
    /// Parity: log-probs on a device and dtype against the CPU in f32, same random weights.
    Parity(super::bench_parity::ParityArgs),
}

/// A model with random weights: any `config.json`, optionally cut to its first layers.
#[derive(clap::Args, Debug, Clone)]
pub struct RandomModelArgs {
    /// A `config.json` to instantiate with random weights (e.g. configs/models/qwen2.5-vl-7b.json);
    /// the tiny model without it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Keep only the first N decoder layers and N vision blocks: a few-layer stack of a big shape.
    #[arg(long)]
    pub layers: Option<usize>,
}

impl RandomModelArgs {
    /// The config to instantiate.
    pub fn config(&self) -> Result<Config> {
        let mut config = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                Config::from_json_str(&text, path)?
            }
            None => {
                let dir = tempfile::tempdir()?;
                create_tiny(dir.path(), &TinySpec::default())?
            }
        };
        if let Some(n) = self.layers {
            if n == 0 {
                bail!("--layers 0: expected at least one layer");
            }
            config.text.num_hidden_layers = config.text.num_hidden_layers.min(n);
            config.vision.depth = config.vision.depth.min(n);
            config.vision.fullatt_block_indexes.retain(|&i| i < n);
        }
        Ok(config)
    }
}

/// Arguments of `medrl bench weight-sync`.
#[derive(clap::Args, Debug)]
pub struct WeightSyncArgs {
    /// Blob size in MiB (16.6 GB for Qwen2.5-VL-7B in bf16), of random bytes.
    #[arg(long, default_value_t = 1024)]
    pub mib: usize,
    /// Instead of random bytes, a model of this `config.json` with random weights (on
    /// `--device`, in `--dtype`): adds the learner's encode and the worker's decode timings.
    #[arg(long, conflicts_with = "mib")]
    pub config: Option<PathBuf>,
    /// Where the model's weights live and the dtype they travel in (with `--config`).
    #[command(flatten)]
    pub runtime: DeviceArgs,
    /// Chunk size in KiB (default: the publisher's).
    #[arg(long, default_value_t = medrl_weight_sync::PublisherOptions::default().chunk_bytes >> 10)]
    pub chunk_kib: usize,
}

/// Arguments of `medrl bench learner`.
#[derive(clap::Args, Debug)]
pub struct LearnerArgs {
    #[command(flatten)]
    pub model: RandomModelArgs,
    /// Sequences per step (one micro-batch).
    #[arg(long, default_value_t = 8)]
    pub sequences: usize,
    /// Prompt text tokens per sequence besides the image.
    #[arg(long, default_value_t = 115)]
    pub prompt_tokens: usize,
    /// Square image side in pixels (multiple of 28); 0 for none.
    #[arg(long, default_value_t = 112)]
    pub image_size: usize,
    /// Completion tokens per sequence (those in the loss).
    #[arg(long, default_value_t = 64)]
    pub completion_tokens: usize,
    /// all | no_vision | lora
    #[arg(long, default_value = "all")]
    pub trainable: String,
    /// Recompute each decoder layer in the backward pass.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub checkpointing: bool,
    /// adamw: the whole step; none: forward + backward only (a full 7B AdamW state fits one
    /// 80 GB GPU only with --offload, see docs/memory.md).
    #[arg(long, default_value = "adamw")]
    pub optimizer: String,
    /// Keep AdamW's state and the gradient sums in host memory (`optimizer.offload`).
    #[arg(long)]
    pub offload: bool,
    /// AdamW moment dtype: f32 | bf16 (`optimizer.moments`).
    #[arg(long, default_value = "f32")]
    pub moments: String,
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    #[command(flatten)]
    pub runtime: DeviceArgs,
}

/// Arguments of `medrl bench rollout`.
#[derive(clap::Args, Debug)]
pub struct RolloutArgs {
    /// A model directory; without it, random weights (see --config).
    #[arg(long, conflicts_with_all = ["config", "layers"])]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub random: RandomModelArgs,
    /// Prompts per batch; a list (1,8,32) runs each batch size on the one loaded model and prints
    /// a line for each.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub prompts: Vec<usize>,
    #[arg(long, default_value_t = 8)]
    pub samples: usize,
    /// Text tokens per prompt besides the image.
    #[arg(long, default_value_t = 115)]
    pub prompt_tokens: usize,
    /// Square image side in pixels (multiple of 28); 0 for text-only prompts.
    #[arg(long, default_value_t = 112)]
    pub image_size: usize,
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Untimed warm-up runs before the timed one.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    #[command(flatten)]
    pub runtime: DeviceArgs,
}

/// Runs the benchmark and prints one JSON line.
pub fn run(b: Bench) -> Result<()> {
    match b {
        Bench::Rollout(a) => rollout(a),
        Bench::Learner(a) => learner(a),
        Bench::Coordinator(a) => super::bench_coordinator::run(a),
        Bench::WeightSync(a) => weight_sync(a),
        Bench::Parity(a) => super::bench_parity::run(a),
    }
}

/// The rollout benchmark's model, with projections fused as the rollout worker's are.
fn load_model(a: &RolloutArgs) -> Result<Qwen25Vl> {
    let (dtype, device) = (a.runtime.dtype()?, a.runtime.device()?);
    let mut model = match &a.model {
        Some(dir) => Qwen25Vl::load(dir, dtype, &device).with_context(|| format!("loading {}", dir.display()))?,
        None => {
            let config = a.random.config()?;
            let weights = Weights::random(&config, 0, dtype, &device)?;
            Qwen25Vl::new(config, &weights, dtype, &device)?
        }
    };
    model.fuse_projections()?;
    Ok(model)
}

/// A prompt of one random square image and `prompt_tokens` random ordinary tokens.
pub(crate) fn synthetic_prompt(model: &Qwen25Vl, image_size: usize, prompt_tokens: usize, rng: &mut StdRng) -> Result<(Vec<u32>, Vec<ProcessedImage>)> {
    let c = &model.config;
    let mut ids: Vec<u32> = Vec::new();
    let mut images = Vec::new();
    if image_size > 0 {
        if !image_size.is_multiple_of(28) {
            bail!("--image-size {image_size}: expected a multiple of 28");
        }
        let g = image_size / c.vision.patch_size;
        let grid = [1, g, g];
        let n = g * g * c.vision.patch_dim();
        images.push(ProcessedImage { pixel_values: (0..n).map(|_| rng.random::<f32>() - 0.5).collect(), grid_thw: grid });
        ids.push(c.vision_start_token_id);
        ids.extend(std::iter::repeat_n(c.image_token_id, g * g / c.vision.merge_unit()));
        ids.push(c.vision_end_token_id);
    }
    ids.extend(random_tokens(c, prompt_tokens, rng));
    Ok((ids, images))
}

/// `n` random ordinary tokens, clear of the special ids at the top of Qwen's vocabulary.
pub(crate) fn random_tokens(config: &Config, n: usize, rng: &mut StdRng) -> Vec<u32> {
    let top = (config.vision_start_token_id as usize).min(config.text.vocab_size).max(2);
    (0..n).map(|_| rng.random_range(1..top) as u32).collect()
}

/// Peak resident memory of this process (VmHWM).
pub(crate) fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
}

fn rollout(a: RolloutArgs) -> Result<()> {
    let model = load_model(&a)?;
    for &prompts in &a.prompts {
        rollout_batch(&model, &a, prompts)?;
    }
    Ok(())
}

fn rollout_batch(model: &Qwen25Vl, a: &RolloutArgs, prompts: usize) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(0);
    let prompts: Vec<(Vec<u32>, Vec<ProcessedImage>)> = (0..prompts).map(|_| synthetic_prompt(model, a.image_size, a.prompt_tokens, &mut rng)).collect::<Result<_>>()?;
    let requests: Vec<Request<'_>> = prompts.iter().map(|(ids, images)| Request { prompt: ids, images, num_samples: a.samples }).collect();
    let params = GenerationParams { sampling: Sampling::Random { temperature: 1.0, top_p: 1.0, top_k: 0 }, max_new_tokens: a.new_tokens, seed: 0 };
    let prefill = || -> Result<f64> {
        let start = Instant::now();
        for (ids, images) in &prompts {
            let batch = model.batch(&[Sequence { ids, images }], 0)?;
            let mut cache = KvCache::default();
            model.forward_with_cache(&batch, Some(&mut cache), Exec::Infer)?;
        }
        model.device().synchronize()?;
        Ok(start.elapsed().as_secs_f64())
    };
    for _ in 0..a.warmup {
        prefill()?;
        // No stop tokens: every sample runs to the token budget, so the work is fixed.
        generate(model, &requests, &GenerationParams { max_new_tokens: a.new_tokens.min(4), ..params }, &[], 0)?;
    }
    let prefill_s = prefill()?;
    let start = Instant::now();
    let outs = generate(model, &requests, &params, &[], 0)?;
    let total_s = start.elapsed().as_secs_f64();
    let generated: usize = outs.iter().flatten().map(|c| c.token_ids.len()).sum();
    let prompt_tokens: usize = prompts.iter().map(|(ids, _)| ids.len()).sum();
    let decode_s = (total_s - prefill_s).max(1e-9);
    let report = serde_json::json!({
        "bench": "rollout",
        "device": a.runtime.device,
        "dtype": a.runtime.dtype,
        "parameters": model_parameters(model),
        "layers": model.config.text.num_hidden_layers,
        "decode_attention": medrl_model::group_cache::decode_attention_kind(model.device()),
        "prompts": prompts.len(),
        "samples_per_prompt": a.samples,
        "prompt_tokens_each": prompts.first().map_or(0, |(ids, _)| ids.len()),
        "new_tokens": a.new_tokens,
        "prefill_s": prefill_s,
        "prefill_tok_per_s": prompt_tokens as f64 / prefill_s,
        "rollout_s": total_s,
        "rollout_tok_per_s": generated as f64 / total_s,
        "decode_tok_per_s": generated as f64 / decode_s,
        "decode_step_ms": decode_s * 1000.0 / a.new_tokens as f64,
        "peak_rss_bytes": peak_rss_bytes(),
    });
    println!("{report}");
    Ok(())
}

fn model_parameters(model: &Qwen25Vl) -> usize {
    medrl_model::weights::expected_shapes(&model.config).iter().map(|(_, s)| s.iter().product::<usize>()).sum()
}

/// A flag that takes a run-config value, read by the config's own names (`no_vision`, `bf16`).
fn config_value<T: serde::de::DeserializeOwned>(flag: &str, value: &str) -> Result<T> {
    serde_json::from_value(serde_json::Value::String(value.into())).with_context(|| format!("{flag} {value}"))
}

fn learner(a: LearnerArgs) -> Result<()> {
    use medrl_learner::config::{LearnerConfig, Trainable};
    use medrl_learner::loss::{PolicyLossConfig, PolicyLossInputs, mask_from_lengths, policy_loss};
    use medrl_learner::optim::{AdamW, GradAccumulator, MomentDType, Optimizer, clip_grad_norm};
    use medrl_learner::policy::Policy;

    let (dtype, device) = (a.runtime.dtype()?, a.runtime.device()?);
    let trainable: Trainable = config_value("--trainable", &a.trainable)?;
    let with_optimizer = match a.optimizer.as_str() {
        "adamw" => true,
        "none" => false,
        other => bail!("--optimizer {other}: expected adamw or none"),
    };
    let moments: MomentDType = config_value("--moments", &a.moments)?;
    let config = a.model.config()?;
    let weights = Weights::random(&config, 0, dtype, &device)?;
    let mut cfg = LearnerConfig { trainable, ..LearnerConfig::default() };
    (cfg.optimizer.moments, cfg.optimizer.offload) = (moments, a.offload);
    let (model, policy) = Policy::from_weights(config, weights, &cfg, dtype, &device)?;
    let placement = cfg.optimizer.placement();
    let mut adamw = if with_optimizer { Some(AdamW::placed(policy.params.clone(), cfg.optimizer.adamw(), placement)?) } else { None };
    let vars = policy.vars();
    let mut rng = StdRng::seed_from_u64(0);
    let mut seqs = Vec::new();
    for _ in 0..a.sequences {
        let (mut ids, images) = synthetic_prompt(&model, a.image_size, a.prompt_tokens, &mut rng)?;
        let start = ids.len();
        ids.extend(random_tokens(&model.config, a.completion_tokens, &mut rng));
        seqs.push((ids, images, start));
    }
    let batch = model.batch(&seqs.iter().map(|(ids, images, _)| Sequence { ids, images }).collect::<Vec<_>>(), 0)?;
    let spans: Vec<std::ops::Range<usize>> = seqs.iter().map(|(ids, _, s)| *s..ids.len()).collect();
    let lens: Vec<usize> = spans.iter().map(|s| s.len()).collect();
    let mask = mask_from_lengths(&lens, a.completion_tokens, &device)?;
    let advantages = Tensor::from_vec((0..a.sequences).map(|i| if i % 2 == 0 { 1f32 } else { -1.0 }).collect::<Vec<_>>(), a.sequences, &device)?;
    let loss_cfg = PolicyLossConfig::default();
    let n = a.sequences;
    let width = a.completion_tokens;
    let mut loss_of = |lp: &Tensor| -> medrl_model::Result<Tensor> {
        let lp = lp.reshape((n, width))?;
        let inputs = PolicyLossInputs { logprobs: &lp, old_logprobs: None, advantages: &advantages, mask: &mask, ref_logprobs: None, denominator: None };
        policy_loss(&loss_cfg, &inputs).map(|l| l.loss).map_err(|e| medrl_model::Error::Input(e.to_string()))
    };
    let mut step = || -> Result<(f64, f64, [f64; 3])> {
        let start = Instant::now();
        let (_, _, grads) = if a.checkpointing {
            model.checkpointed_backward(&batch, &spans, &mut loss_of)?
        } else {
            let lp = model.span_logprobs(&batch, &spans, Exec::Train)?;
            let loss = loss_of(&lp)?;
            (lp, 0.0, loss.backward()?)
        };
        device.synchronize()?;
        let fwd_bwd = start.elapsed().as_secs_f64();
        let mut phases = [0f64; 3];
        if let Some(adamw) = adamw.as_mut() {
            // As the trainer does it: sum (in host memory with --offload), clip, step.
            let mut lap = Instant::now();
            let mut split = |i: usize| -> Result<()> {
                device.synchronize()?;
                phases[i] = lap.elapsed().as_secs_f64();
                lap = Instant::now();
                Ok(())
            };
            let mut acc = GradAccumulator::new(vars.clone(), placement);
            acc.add(&grads)?;
            drop(grads);
            let mut sums = acc.take(1.0)?;
            split(0)?;
            clip_grad_norm(&mut sums, &vars, 5.0)?;
            split(1)?;
            adamw.step(&sums)?;
            split(2)?;
        }
        Ok((fwd_bwd, start.elapsed().as_secs_f64(), phases))
    };
    for _ in 0..a.warmup {
        step()?;
    }
    let (fwd_bwd_s, step_s, [sum_s, clip_s, adamw_s]) = step()?;
    let tokens = batch.len() * a.sequences;
    let report = serde_json::json!({
        "bench": "learner",
        "device": a.runtime.device,
        "dtype": a.runtime.dtype,
        "parameters": model_parameters(&model),
        "trainable_parameters": vars.iter().map(|v| v.elem_count()).sum::<usize>(),
        "trainable": a.trainable,
        "checkpointing": a.checkpointing,
        "optimizer": a.optimizer,
        "offload": a.offload,
        "moments": a.moments,
        "layers": model.config.text.num_hidden_layers,
        "sequences": a.sequences,
        "tokens_per_sequence": batch.len(),
        "fwd_bwd_s": fwd_bwd_s,
        "fwd_bwd_tok_per_s": tokens as f64 / fwd_bwd_s,
        "step_s": step_s,
        "optimizer_s": step_s - fwd_bwd_s,
        "grad_sum_s": sum_s,
        "clip_s": clip_s,
        "adamw_s": adamw_s,
        "step_tok_per_s": tokens as f64 / step_s,
        "peak_rss_bytes": peak_rss_bytes(),
    });
    println!("{report}");
    Ok(())
}

fn weight_sync(a: WeightSyncArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let model = match &a.config {
        Some(path) => {
            let config = RandomModelArgs { config: Some(path.clone()), layers: None }.config()?;
            let (dtype, device) = (a.runtime.dtype()?, a.runtime.device()?);
            Some((Weights::random(&config, 0, dtype, &device)?, config, dtype, device))
        }
        None => None,
    };
    let started = Instant::now();
    let blob = match &model {
        Some((weights, _, dtype, _)) => medrl_weight_sync::encode_weights(weights, *dtype)?,
        None => medrl_weight_sync::pseudo_random_blob(a.mib << 20, 7),
    };
    let encode_s = started.elapsed().as_secs_f64();
    let r = runtime.block_on(medrl_weight_sync::bench_loopback(blob.clone(), a.chunk_kib << 10))?;
    let bytes = blob.len();
    // The bytes a worker decodes are these: the fetch verified them against the digest. Then the
    // learner's next encode, into this blob's memory as `spare_buffer` lends it.
    let (decode_s, warm_encode_s) = match &model {
        Some((weights, config, dtype, device)) => {
            let started = Instant::now();
            drop(medrl_weight_sync::decode_weights(&blob, config, *dtype, device)?);
            let decode_s = started.elapsed().as_secs_f64();
            let spare = medrl_weight_sync::reusable_buffer(blob);
            let started = Instant::now();
            drop(medrl_weight_sync::encode_weights_into(weights, *dtype, spare)?);
            (Some(decode_s), Some(started.elapsed().as_secs_f64()))
        }
        None => (None, None),
    };
    let gb = bytes as f64 / 1e9;
    let fetch = |t: &medrl_weight_sync::FetchTiming| serde_json::json!({ "seconds": t.seconds, "gb_per_s": t.gb_per_s, "cpu_s": t.cpu_s, "cpu_s_per_gb": t.cpu_s.map(|cpu| cpu / gb) });
    let report = serde_json::json!({
        "bench": "weight-sync",
        "transport": "grpc",
        "blob": if model.is_some() { "model" } else { "random" },
        "config": a.config,
        "dtype": model.as_ref().map(|_| &a.runtime.dtype),
        "device": model.as_ref().map(|_| &a.runtime.device),
        "bytes": bytes,
        "chunk_bytes": a.chunk_kib << 10,
        "encode_s": model.as_ref().map(|_| encode_s),
        "warm_encode_s": warm_encode_s,
        "publish_s": r.publish_s,
        "fetch_s": r.cold.seconds,
        "gb_per_s": r.cold.gb_per_s,
        "cold": fetch(&r.cold),
        "warm": fetch(&r.warm),
        "decode_s": decode_s,
    });
    println!("{report}");
    Ok(())
}
