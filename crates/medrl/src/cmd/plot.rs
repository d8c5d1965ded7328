//! `medrl plot RUN_DIR`: the figures of a training run (reward, Acc@1 / Pass@K, throughput,
//! staleness, support map) as PNGs, from the logs `medrl train` or the separate roles wrote.

use std::path::PathBuf;

use anyhow::{Context, Result};
use medrl_eval::plot_run;

/// Arguments of `medrl plot`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The run directory (`run.output_dir`).
    pub run_dir: PathBuf,
    /// Folder for the PNGs [default: RUN_DIR/plots].
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Draws every figure the run's logs allow and says which were skipped and why.
pub fn run(a: Args) -> Result<()> {
    let out = a.out.clone().unwrap_or_else(|| a.run_dir.join("plots"));
    let report = plot_run(&a.run_dir, &out).with_context(|| format!("plotting run {}", a.run_dir.display()))?;
    for path in &report.written {
        println!("wrote {}", path.display());
    }
    for (name, why) in &report.skipped {
        println!("skipped {name}: {why}");
    }
    Ok(())
}
