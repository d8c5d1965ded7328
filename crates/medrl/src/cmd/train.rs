//! `medrl train`: the recipe end to end in one run directory. Without `--config` it runs the
//! embedded default: the tiny model and the synthetic VQA task on CPU.

use std::path::Path;

use anyhow::{Context, Result};
use medrl_eval::run_log::{StepPoint, read_steps};
use medrl_eval::{EvalConfig, evaluate, write_outputs};
use medrl_model::pipeline::Vlm;
use medrl_model::tiny::{TinySpec, create_tiny};
use serde_json::json;

use crate::cmd::config::ConfigArgs;
use crate::train::data::{Split, load_split};
use crate::train::rl::run_rl;
use crate::train::sft::run_sft;

/// The embedded default config (`configs/default.yaml`).
pub const DEFAULT_CONFIG: &str = include_str!("../../../../configs/default.yaml");

/// Arguments of `medrl train`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub config: ConfigArgs,
}

/// One evaluation's headline numbers.
#[derive(Debug, Clone, serde::Serialize)]
struct EvalLine {
    phase: String,
    acc_at_1: f64,
    pass_at_k: f64,
    k: u64,
    format_failure_rate: f64,
}

/// Runs the recipe.
pub fn run(a: Args) -> Result<()> {
    let config = a.config.load()?;
    let (dtype, device) = config.model.dtype_device()?;
    let run_dir = config.run.output_dir.clone();
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating run directory {}", run_dir.display()))?;
    std::fs::write(run_dir.join("config.yaml"), yaml_serde::to_string(&config)?).context("writing the resolved config")?;
    let base = match &config.model.path {
        Some(p) => p.clone(),
        None => {
            let dir = run_dir.join("base-model");
            if !dir.join("config.json").exists() {
                create_tiny(&dir, &TinySpec { seed: config.run.seed, ..TinySpec::default() })?;
            }
            dir
        }
    };
    let s = &config.data.synthetic;
    let eval_split = match &config.data.eval {
        Some(src) => Some(load_split(src, "eval", s.eval_size, 1000, s, &run_dir)?),
        None => None,
    };
    let mut evals = Vec::new();
    let mut evaluate_phase = |model: &Path, phase: &str| -> Result<()> {
        if let Some(split) = &eval_split {
            let line = eval_phase(model, phase, split, &config.eval, &run_dir, dtype, &device)?;
            eprintln!("{phase:>6}: Acc@1 {:.1}%  Pass@{} {:.1}%  format failures {:.1}%", 100.0 * line.acc_at_1, line.k, 100.0 * line.pass_at_k, 100.0 * line.format_failure_rate);
            append_metrics(&run_dir, json!({"event": "eval", "phase": phase, "acc_at_1": line.acc_at_1, "pass_at_k": line.pass_at_k, "k": line.k, "format_failure_rate": line.format_failure_rate}))?;
            evals.push(line);
        }
        Ok(())
    };
    evaluate_phase(&base, "before")?;

    let mut policy = base.clone();
    if let (Some(src), true) = (&config.data.sft, config.sft.steps > 0) {
        let split = load_split(src, "sft", s.sft_size, 2000, s, &run_dir)?;
        let out = run_dir.join("sft-model");
        let bar = medrl_eval::run::progress_bar(config.sft.steps, "SFT");
        let mut on_step = |step: u64, loss: f64| {
            bar.inc(1);
            bar.set_message(format!("SFT loss {loss:.3}"));
            let _ = append_metrics(&run_dir, json!({"event": "sft_step", "step": step + 1, "loss": loss}));
        };
        let outcome = run_sft(&base, &out, &split, &config.sft, config.algorithm.template, config.algorithm.system_prompt.as_deref(), &config.learner, dtype, &device, &mut on_step)?;
        bar.finish_and_clear();
        eprintln!("   SFT: {} steps, loss {:.3} -> {:.3} in {:.0} s", config.sft.steps, outcome.first_loss, outcome.last_loss, outcome.seconds);
        policy = out;
        evaluate_phase(&policy, "sft")?;
    }
    let mut rl_summary = serde_json::Value::Null;
    if config.learner.total_steps > 0 {
        let split = load_split(&config.data.train, "train", s.rl_size, 0, s, &run_dir)?;
        let bar = medrl_eval::run::progress_bar(config.learner.total_steps, "GRPO");
        let mut on_step = |step: u64| {
            bar.set_position(step);
        };
        let outcome = run_rl(&config, &policy, &split, &run_dir, dtype, &device, &mut on_step)?;
        bar.finish_and_clear();
        // The learner's step log as `medrl plot` reads it; the summary is only a report, so an
        // unreadable log gives NaN rather than failing the finished run.
        let steps = read_steps(&run_dir.join("rl").join(medrl_learner::service::METRICS_JSONL)).unwrap_or_default();
        let (first, last) = (window_mean(&steps, true), window_mean(&steps, false));
        eprintln!(
            "   RL: {} steps in {:.0} s; mean reward {:.3} -> {:.3}, rollout accuracy {:.1}% -> {:.1}%",
            outcome.steps, outcome.seconds, first.0, last.0, 100.0 * first.1, 100.0 * last.1
        );
        rl_summary = json!({"steps": outcome.steps, "seconds": outcome.seconds, "mean_reward_first": first.0, "mean_reward_last": last.0, "accuracy_first": first.1, "accuracy_last": last.1});
        policy = outcome.model;
        evaluate_phase(&policy, "after")?;
    }
    if !evals.is_empty() {
        eprintln!("\n| phase | Acc@1 | Pass@K | format failures |\n|---|---|---|---|");
        for e in &evals {
            eprintln!("| {} | {:.1}% | {:.1}% (K={}) | {:.1}% |", e.phase, 100.0 * e.acc_at_1, 100.0 * e.pass_at_k, e.k, 100.0 * e.format_failure_rate);
        }
    }
    eprintln!("run directory: {}", run_dir.display());
    let summary = json!({"run_dir": run_dir, "model": policy, "evals": evals, "rl": rl_summary});
    std::fs::write(run_dir.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;
    Ok(())
}

fn eval_phase(model: &Path, phase: &str, split: &Split, config: &EvalConfig, run_dir: &Path, dtype: candle_core::DType, device: &candle_core::Device) -> Result<EvalLine> {
    let vlm = Vlm::load_for_inference(model, dtype, device).with_context(|| format!("loading {} for evaluation", model.display()))?;
    let dir = run_dir.join("eval").join(phase);
    std::fs::create_dir_all(&dir)?;
    let samples = dir.join("samples.jsonl");
    // A fresh evaluation of this phase: earlier samples belong to an earlier model.
    let _ = std::fs::remove_file(&samples);
    let _ = std::fs::remove_file(dir.join(medrl_eval::run::RUN_SETTINGS_FILE));
    let items = evaluate(&vlm, &split.records, &split.base(), config, &samples)?;
    let outputs = write_outputs(&items, &dir, &Default::default())?;
    let overall = &outputs.metrics.overall;
    let (k, pass) = overall.support().unwrap_or((1, overall.acc_at_1));
    Ok(EvalLine { phase: phase.into(), acc_at_1: overall.acc_at_1, pass_at_k: pass, k, format_failure_rate: overall.format_failure_rate })
}

/// Appends one JSON line to the run's metrics.jsonl.
pub fn append_metrics(run_dir: &Path, mut value: serde_json::Value) -> Result<()> {
    use std::io::Write;
    if let Some(obj) = value.as_object_mut() {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        obj.insert("time".into(), now.into());
    }
    let path = run_dir.join("metrics.jsonl");
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).with_context(|| format!("opening {}", path.display()))?;
    writeln!(f, "{value}")?;
    Ok(())
}

/// (mean reward, mean accuracy) over the first (or last) quarter of the steps, at least one.
fn window_mean(steps: &[StepPoint], first: bool) -> (f64, f64) {
    if steps.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let n = (steps.len() / 4).max(1);
    let w = if first { &steps[..n] } else { &steps[steps.len() - n..] };
    (w.iter().map(|s| s.mean_reward).sum::<f64>() / n as f64, w.iter().map(|s| s.mean_accuracy).sum::<f64>() / n as f64)
}
