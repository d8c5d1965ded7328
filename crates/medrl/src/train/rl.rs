//! The RL phase of `medrl train`: the coordinator, the learner and N rollout workers as the real
//! gRPC services, in one process, talking over loopback.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use medrl_coordinator::{PromptSet, serve_with};
use medrl_proto::ServerOptions;
use medrl_learner::service::{resume_or_new, serve_learner};
use medrl_rollout::run_worker;

use crate::config::RunConfig;
use crate::train::data::Split;

/// What the RL phase produced.
pub struct RlOutcome {
    /// The final policy in the HF layout.
    pub model: PathBuf,
    pub steps: u64,
    pub seconds: f64,
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Runs GRPO on `split` starting from `policy`, with everything under `run_dir/rl`.
pub fn run_rl(config: &RunConfig, policy: &Path, split: &Split, run_dir: &Path, dtype: DType, device: &Device, on_step: &mut dyn FnMut(u64)) -> Result<RlOutcome> {
    let start = std::time::Instant::now();
    let dir = run_dir.join("rl");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let runtime = crate::cmd::roles::runtime()?;
    let outcome = runtime.block_on(async {
        let mut cc = config.coordinator.clone();
        cc.listen = loopback();
        cc.metrics_listen = None;
        cc.journal = Some(dir.join("coordinator.journal"));
        // The same token and TLS as the learner and the workers dialling it.
        let options = ServerOptions::default().with_security(&crate::cmd::roles::security(config, crate::cmd::roles::TlsSides::Server)?);
        let coordinator = serve_with(cc, PromptSet::from_jsonl(&split.file)?, options).await.context("starting the coordinator")?;
        let mut settings = crate::cmd::roles::learner_settings(config, coordinator.endpoint(), policy.to_path_buf())?;
        settings.listen = loopback();
        settings.metrics_listen = None;
        settings.run_dir = dir.clone();
        let (trainer, _) = resume_or_new(&dir, policy, config.algorithm.clone(), config.learner.clone(), dtype, device)?;
        let learner = serve_learner(settings, trainer).await.context("starting the learner")?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut workers = Vec::new();
        for i in 0..config.cluster.local_workers.max(1) {
            let settings = crate::cmd::roles::worker_settings(config, format!("local-{i}"), coordinator.endpoint(), learner.endpoint(), policy.to_path_buf())?;
            let mut stop = stop_rx.clone();
            workers.push(tokio::spawn(async move { run_worker(settings, async move { let _ = stop.changed().await; }).await }));
        }
        let mut seen = 0u64;
        {
            let wait = learner.wait_done();
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    r = &mut wait => { r?; break; }
                    _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {
                        let steps = learner.state().map(|s| s.steps).unwrap_or(seen);
                        while seen < steps { seen += 1; on_step(seen); }
                    }
                }
            }
        }
        let _ = stop_tx.send(true);
        for w in workers {
            match w.await {
                Ok(Err(e)) => tracing::warn!(error = %e, "a rollout worker ended with an error"),
                Err(e) => tracing::warn!(error = %e, "a rollout worker panicked"),
                Ok(Ok(_)) => {}
            }
        }
        let steps = learner.state().map(|s| s.steps).unwrap_or(seen);
        while seen < steps { seen += 1; on_step(seen); }
        learner.shutdown().await?;
        coordinator.shutdown().await?;
        anyhow::Ok(steps)
    })?;
    Ok(RlOutcome { model: dir.join("final"), steps: outcome, seconds: start.elapsed().as_secs_f64() })
}
