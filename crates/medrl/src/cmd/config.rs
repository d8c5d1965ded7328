//! `medrl config`: validate a run config and print it resolved (defaults filled, overrides applied).

use std::path::PathBuf;

use anyhow::Result;

use crate::config::RunConfig;

/// Arguments of `medrl config`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Run config (YAML); the embedded default when absent.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long = "set")]
    pub overrides: Vec<String>,
    /// Print JSON instead of YAML.
    #[arg(long)]
    pub json: bool,
}

/// Prints the resolved config, or fails naming the file and the key.
pub fn run(a: Args) -> Result<()> {
    let config = RunConfig::load_or_default(a.config.as_deref(), &a.overrides)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&config)?);
    } else {
        print!("{}", yaml_serde::to_string(&config)?);
    }
    Ok(())
}
