//! `medrl tiny-model`: a tiny random model for the CPU default run and for tests.

use std::path::PathBuf;

use anyhow::{Context, Result};
use medrl_model::tiny::{TinySpec, create_tiny};

/// Arguments of `medrl tiny-model`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Output directory (created).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Writes the model and prints where.
pub fn run(a: Args) -> Result<()> {
    let spec = TinySpec { seed: a.seed, ..TinySpec::default() };
    let config = create_tiny(&a.out, &spec).with_context(|| format!("creating a tiny model in {}", a.out.display()))?;
    println!("{}: tiny Qwen2.5-VL, {} text layers, hidden {}, vocab {}", a.out.display(), config.text.num_hidden_layers, config.text.hidden_size, config.text.vocab_size);
    Ok(())
}
