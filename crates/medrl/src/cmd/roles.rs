//! `medrl coordinator|worker|learner --config FILE`: the roles as separate processes (pods).

use std::path::PathBuf;

use anyhow::{Context, Result};
use medrl_coordinator::{PromptSet, serve_with};
use medrl_learner::service::{LearnerSettings, resume_or_new, serve_learner};
use medrl_proto::{ClientAuth, Security, SecuritySection, ServerOptions};
use medrl_rollout::{WorkerSettings, WorkerTuning, run_worker};

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

/// Serves the coordinator until the run is done (plus `coordinator.linger_s`) or a signal.
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
    let linger = cc.linger();
    let options = ServerOptions::default().with_security(&security(&config, TlsSides::Server)?);
    runtime()?.block_on(async move {
        let handle = serve_with(cc, prompts, options).await?;
        tracing::info!(endpoint = %handle.endpoint(), "coordinator serving");
        handle.run_until_stopped(linger).await?;
        anyhow::Ok(())
    })
}

/// Which sides of TLS a role takes: every role dials peers; the coordinator and the learner serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsSides {
    /// Dials peers only (a worker).
    Client,
    /// Serves only (the coordinator).
    Server,
    /// Dials and serves (the learner, `medrl train`).
    Both,
}

/// Token and TLS for a role: `cluster.token_file`, else `MEDRL_TOKEN_FILE`, else `MEDRL_TOKEN`,
/// and `cluster.tls` (resolved by `medrl_proto::SecuritySection`); never logged. The TLS files
/// of `sides` are read now, so a bad one stops the role at start naming it (a client would
/// otherwise retry its failing connection forever).
pub fn security(config: &RunConfig, sides: TlsSides) -> Result<Security> {
    // medrl_proto names the settings `security.*`; in a run config they live under `cluster`.
    let context = "the run's secrets (cluster.token_file and cluster.tls; `security.X` below is `cluster.X`)";
    let section = SecuritySection { token_file: config.cluster.token_file.clone(), tls: config.cluster.tls.clone() };
    let security = section.resolve().context(context)?;
    if let Some(tls) = &security.tls {
        if sides != TlsSides::Server {
            tls.client_config().context(context)?;
        }
        if sides != TlsSides::Client {
            tls.server_config(ServerOptions::default().tls_handshake_timeout).context(context)?;
        }
    }
    Ok(security)
}

/// A worker's settings from the run config.
pub fn worker_settings(config: &RunConfig, name: String, coordinator: String, learner: String, model_dir: PathBuf) -> Result<WorkerSettings> {
    let security = security(config, TlsSides::Client)?;
    let auth = ClientAuth::from_token(security.token.as_ref())?;
    let (dtype, device) = config.model.dtype_device()?;
    Ok(WorkerSettings {
        name,
        coordinator,
        learner,
        model_dir,
        dtype,
        device,
        rollout: config.rollout.clone(),
        template: config.algorithm.template,
        system_prompt: config.algorithm.system_prompt.clone(),
        rewards: config.algorithm.rewards,
        health_listen: None,
        metrics_listen: None,
        auth,
        tls: security.tls,
        tuning: WorkerTuning::default(),
    })
}

/// Runs one rollout worker until the coordinator says the run is done, or a signal.
pub fn worker(a: RoleArgs) -> Result<()> {
    let config = a.load()?;
    let model = config.model.path.clone().context("model.path: a worker needs the model directory (the run's starting weights)")?;
    let name = std::env::var("HOSTNAME").unwrap_or_else(|_| format!("worker-{}", std::process::id()));
    let mut settings = worker_settings(&config, name, config.cluster.coordinator.clone(), config.cluster.learner.clone(), model)?;
    settings.health_listen = config.cluster.worker_health_listen;
    settings.metrics_listen = config.cluster.worker_metrics_listen;
    runtime()?.block_on(async move {
        let stats = run_worker(settings, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
        tracing::info!(?stats, "worker finished");
        anyhow::Ok(())
    })
}

/// The learner service's settings from the run config.
pub fn learner_settings(config: &RunConfig, coordinator: String, base_model: PathBuf) -> Result<LearnerSettings> {
    let mut settings = LearnerSettings::from_learner_config(&config.learner);
    settings.listen = config.cluster.learner_listen;
    settings.metrics_listen = config.cluster.learner_metrics_listen;
    settings.coordinator = coordinator;
    settings.run_dir = config.run.output_dir.join("learner");
    settings.base_model = base_model;
    settings.prompts_per_step = config.coordinator.prompts_per_step as usize;
    settings.max_staleness = u64::from(config.coordinator.max_staleness);
    let sec = security(config, TlsSides::Both)?;
    settings.server = settings.server.with_security(&sec);
    settings.client = settings.client.with_security(&sec)?;
    Ok(settings)
}

/// Serves the learner until the coordinator's run is done (resuming from the newest checkpoint of
/// the run directory when there is one).
pub fn learner(a: RoleArgs) -> Result<()> {
    let config = a.load()?;
    let base = config.model.path.clone().context("model.path: the learner needs the starting model directory")?;
    let (dtype, device) = config.model.dtype_device()?;
    let settings = learner_settings(&config, config.cluster.coordinator.clone(), base.clone())?;
    std::fs::create_dir_all(&settings.run_dir).with_context(|| format!("creating {}", settings.run_dir.display()))?;
    let (trainer, _) = resume_or_new(&settings.run_dir, &base, config.algorithm.clone(), config.learner.clone(), dtype, &device)?;
    runtime()?.block_on(async move {
        let handle = serve_learner(settings, trainer).await?;
        tracing::info!(endpoint = %handle.endpoint(), "learner serving");
        tokio::select! {
            r = handle.wait_done() => { r?; }
            _ = tokio::signal::ctrl_c() => { tracing::info!("interrupted"); }
        }
        handle.shutdown().await?;
        anyhow::Ok(())
    })
}
