//! medrl: reinforcement-learning post-training of medical vision-language models.

mod cluster;
mod cmd;
mod config;
mod runtime;
mod train;

use clap::{Parser, Subcommand};

/// RL post-training and diagnostics for Qwen2.5-VL medical VLMs.
#[derive(Parser)]
#[command(name = "medrl", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the recipe: evaluate, SFT, GRPO through the real roles, evaluate (embedded CPU default without --config).
    Train(cmd::train::Args),
    /// Run a rollout worker: lease prompts, sample K completions each, stream rewarded groups.
    Worker(cmd::roles::RoleArgs),
    /// Validate a run config and print it resolved.
    Config(cmd::config::Args),
    /// Serve the coordinator role: prompt leases, the data order, the policy-version clock.
    Coordinator(cmd::roles::RoleArgs),
    /// Sample completions for one chat prompt (images first, then text).
    Generate(cmd::generate::Args),
    /// Log-prob of every completion token of a JSONL file of prompts and completions.
    Score(cmd::score::Args),
    /// Create a tiny random Qwen2.5-VL-shaped model in the Hugging Face layout.
    TinyModel(cmd::tiny::Args),
    /// Greedy Acc@1 vs unbiased Pass@k of a model on VQA records, or recomputed from a samples file.
    Eval(cmd::eval::Args),
    /// Linear or kNN probe of a model's frozen vision tower on labelled images.
    Probe(cmd::probe::Args),
    /// Measure speed on a model or a random one of any config, printing JSON.
    #[command(subcommand)]
    Bench(cmd::bench::Bench),
    /// The learner role (`--config FILE`), or `step`: one optimizer step from a recorded batch.
    Learner(cmd::learner::Args),
    /// Datasets to record JSONL (MedMNIST, PMC-VQA, eval kit, LLaVA, synthetic); subsets and filters.
    Data(cmd::data::Args),
    /// Figures of a run directory (reward, Acc@1 / Pass@K, throughput, staleness, support map) as PNGs.
    Plot(cmd::plot::Args),
}

fn main() -> std::process::ExitCode {
    runtime::init_logging();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(a) => cmd::train::run(a),
        Command::Coordinator(a) => cmd::roles::coordinator(a),
        Command::Config(a) => cmd::config::run(a),
        Command::Worker(a) => cmd::roles::worker(a),
        Command::Generate(a) => cmd::generate::run(a),
        Command::Score(a) => cmd::score::run(a),
        Command::TinyModel(a) => cmd::tiny::run(a),
        Command::Eval(a) => cmd::eval::run(a),
        Command::Probe(a) => cmd::probe::run(a),
        Command::Bench(b) => cmd::bench::run(b),
        Command::Data(a) => cmd::data::run(a),
        Command::Learner(a) => cmd::learner::run(a),
        Command::Plot(a) => cmd::plot::run(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
