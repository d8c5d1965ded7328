//! `medrl learner step`: one optimizer step from a recorded batch (the replay contract).

use std::path::PathBuf;

use anyhow::{Context, Result};
use medrl_learner::batch::read_groups;
use medrl_learner::trainer::Trainer;

use crate::config::RunConfig;
use crate::runtime::DeviceArgs;

/// Arguments of `medrl learner`: the role (`--config FILE`) or a subcommand.
#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<LearnerCommand>,
    /// Run config: serve the learner role.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long = "set")]
    pub overrides: Vec<String>,
}

/// What the learner does.
#[derive(clap::Subcommand, Debug)]
pub enum LearnerCommand {
    /// Apply one optimizer step from GROUPS.jsonl, write the new weights (HF layout) and print
    /// {"loss", "grad_norm", "rewards", "advantages", "bonus", "tokens"}.
    Step(StepArgs),
}

/// Arguments of `medrl learner step`.
#[derive(clap::Args, Debug)]
pub struct StepArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// One group per line: {"images", "prompt", "answer", "completions", "sampling_logprobs"?}.
    #[arg(long)]
    pub batch: PathBuf,
    /// Run config; its `algorithm` and `learner` sections are used.
    #[arg(long)]
    pub config: PathBuf,
    /// Where the updated model is written.
    #[arg(long)]
    pub output: PathBuf,
    /// Override a config value, e.g. `learner.optimizer.lr=1e-6`.
    #[arg(long = "set")]
    pub overrides: Vec<String>,
    #[command(flatten)]
    pub runtime: DeviceArgs,
}

/// Runs the learner command.
pub fn run(a: Args) -> Result<()> {
    match (a.command, a.config) {
        (Some(LearnerCommand::Step(s)), _) => step(s),
        (None, Some(config)) => crate::cmd::roles::learner(crate::cmd::roles::RoleArgs { config, overrides: a.overrides }),
        (None, None) => anyhow::bail!("medrl learner: give --config FILE to serve the learner, or the `step` subcommand"),
    }
}

fn step(a: StepArgs) -> Result<()> {
    let config = RunConfig::load(&a.config, &a.overrides)?;
    let (dtype, device) = (a.runtime.dtype()?, a.runtime.device()?);
    let mut trainer = Trainer::new(&a.model, config.algorithm.clone(), config.learner.clone(), dtype, &device)
        .with_context(|| format!("loading {} for training", a.model.display()))?;
    let groups = read_groups(&a.batch, &trainer.vlm, config.algorithm.system_prompt.as_deref())?;
    let report = trainer.step(&groups)?;
    trainer.save_model(&a.output).with_context(|| format!("writing {}", a.output.display()))?;
    let line = serde_json::json!({
        "loss": report.loss,
        "grad_norm": report.grad_norm,
        "rewards": report.rewards,
        "advantages": report.advantages,
        "bonus": report.bonus,
        "tokens": report.tokens,
    });
    println!("{line}");
    Ok(())
}
