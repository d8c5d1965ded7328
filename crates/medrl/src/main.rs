//! medrl: reinforcement-learning post-training of medical vision-language models.

mod cmd;
mod runtime;

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
    /// Sample completions for one chat prompt (images first, then text).
    Generate(cmd::generate::Args),
    /// Log-prob of every completion token of a JSONL file of prompts and completions.
    Score(cmd::score::Args),
    /// Create a tiny random Qwen2.5-VL-shaped model in the Hugging Face layout.
    TinyModel(cmd::tiny::Args),
    /// Measure speed on a model or a random one of any config, printing JSON.
    #[command(subcommand)]
    Bench(cmd::bench::Bench),
}

fn main() -> std::process::ExitCode {
    runtime::init_logging();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => cmd::generate::run(a),
        Command::Score(a) => cmd::score::run(a),
        Command::TinyModel(a) => cmd::tiny::run(a),
        Command::Bench(b) => cmd::bench::run(b),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
