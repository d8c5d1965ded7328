//! `medrl config`: validate a run config and print it resolved (defaults filled, overrides applied).

use std::path::PathBuf;

use anyhow::Result;

use crate::config::RunConfig;

/// `--config FILE` (or the embedded default) and its `--set` overrides, as `medrl config` and
/// `medrl train` take them.
#[derive(clap::Args, Debug)]
pub struct ConfigArgs {
    /// Run config (YAML); the embedded default when absent.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a config value, e.g. `run.output_dir=runs/x`.
    #[arg(long = "set")]
    pub overrides: Vec<String>,
}

impl ConfigArgs {
    /// The resolved config: the file (or the embedded default) with the overrides applied.
    pub fn load(&self) -> Result<RunConfig> {
        RunConfig::load_or_default(self.config.as_deref(), &self.overrides)
    }
}

/// Arguments of `medrl config`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Print JSON instead of YAML.
    #[arg(long)]
    pub json: bool,
}

/// Prints the resolved config, or fails naming the file and the key.
pub fn run(a: Args) -> Result<()> {
    let config = a.config.load()?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&config)?);
    } else {
        print!("{}", yaml_serde::to_string(&config)?);
    }
    Ok(())
}
