//! `medrl coordinator|worker|learner --config FILE`: the roles as separate processes (pods).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use medrl_coordinator::{PromptSet, serve};

use crate::config::RunConfig;
use crate::train::data::load_split;

/// Arguments every role takes.
#[derive(clap::Args, Debug, Clone)]
pub struct RoleArgs {
    /// Run config (YAML), the same file for every role.
    #[arg(long)]
    pub config: PathBuf,
    /// Override a config value, e.g. `cluster.coordinator=http://host:50051`.
    #[arg(long = "set")]
    pub overrides: Vec<String>,
}

impl RoleArgs {
    /// The resolved config.
    pub fn load(&self) -> Result<RunConfig> {
        RunConfig::load(&self.config, &self.overrides)
    }
}

/// A tokio runtime for a role.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")
}

/// Serves the coordinator until the run is done (plus a short linger) or a signal.
pub fn coordinator(a: RoleArgs) -> Result<()> {
    let config = a.load()?;
    let run_dir = &config.run.output_dir;
    std::fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let s = &config.data.synthetic;
    let split = load_split(&config.data.train, "train", s.rl_size, 0, s, run_dir)?;
    let mut cc = config.coordinator.clone();
    if cc.journal.is_none() {
        cc.journal = Some(run_dir.join("coordinator.journal"));
    }
    let prompts = PromptSet::from_jsonl(&split.file)?;
    runtime()?.block_on(async move {
        let handle = serve(cc, prompts).await?;
        tracing::info!(endpoint = %handle.endpoint(), "coordinator serving");
        handle.run_until_stopped(Duration::from_secs(10)).await?;
        anyhow::Ok(())
    })
}
