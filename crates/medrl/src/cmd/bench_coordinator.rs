//! `medrl bench coordinator`: lease throughput and latency of one coordinator on loopback under
//! simulated workers that skip the model (the load generator of `medrl_coordinator::loadgen`),
//! printed as one JSON line.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use medrl_coordinator::CoordinatorConfig;
use medrl_coordinator::loadgen::{ClientOptions, LoadSpec, run_load, synthetic_prompts};

/// Arguments of `medrl bench coordinator`.
#[derive(clap::Args, Debug)]
pub struct CoordinatorArgs {
    /// Simulated workers, each with its own connection.
    #[arg(long, default_value_t = 64)]
    pub workers: usize,
    /// Measured duration (the default prompt set outlasts it at any rate seen so far).
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Prompts in the run (per epoch).
    #[arg(long, default_value_t = 200_000)]
    pub prompts: usize,
    /// Prompts per lease.
    #[arg(long, default_value_t = 1)]
    pub prompts_per_lease: u32,
    /// Prompts per learner step (the simulated learner trains as soon as it holds this many).
    #[arg(long, default_value_t = 64)]
    pub prompts_per_step: u32,
    /// Versions a lease may run ahead of the published one.
    #[arg(long, default_value_t = 1)]
    pub max_staleness: u32,
    /// Journal every grant, ack and step to disk (fsynced), as a real run does.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub journal: bool,
}

/// Runs the benchmark and prints one JSON line.
pub fn run(a: CoordinatorArgs) -> Result<()> {
    if a.workers == 0 || !(a.seconds.is_finite() && a.seconds > 0.0 && a.seconds <= 3600.0) {
        bail!("--workers must be at least 1 and --seconds in (0, 3600]");
    }
    let dir = tempfile::tempdir().context("creating a scratch folder for the prompt set")?;
    let prompts = synthetic_prompts(dir.path(), a.prompts)?;
    let config = CoordinatorConfig {
        listen: "127.0.0.1:0".parse()?,
        metrics_listen: None,
        // No lease may expire during the measurement: expiries would be a different benchmark.
        lease_ttl_s: 600.0,
        prompts_per_lease: a.prompts_per_lease,
        prompts_per_step: a.prompts_per_step,
        max_staleness: a.max_staleness,
        retry_after_ms: 10,
        journal: a.journal.then(|| dir.path().join("journal.jsonl")),
        ..CoordinatorConfig::default()
    };
    let spec = LoadSpec {
        workers: a.workers,
        duration: Duration::from_secs_f64(a.seconds),
        prompts_per_lease: a.prompts_per_lease,
        prompts_per_step: a.prompts_per_step as usize,
        ..LoadSpec::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    let report = runtime.block_on(async {
        let handle = medrl_coordinator::serve(config, prompts).await?;
        let options = ClientOptions { request_timeout: Some(Duration::from_secs(30)), ..ClientOptions::default() };
        let report = run_load(&handle.endpoint(), &options, &spec).await;
        handle.shutdown().await?;
        anyhow::Ok(report?)
    })?;
    let json = serde_json::json!({
        "bench": "coordinator",
        "workers": report.workers,
        "seconds": report.elapsed_s,
        "journal": a.journal,
        "prompts_per_lease": a.prompts_per_lease,
        "prompts_per_step": a.prompts_per_step,
        "max_staleness": a.max_staleness,
        "cpus": std::thread::available_parallelism().map(usize::from).unwrap_or(1),
        "leases": report.leases,
        "leases_per_s": report.leases_per_s,
        "lease_calls": report.lease_calls,
        "lease_calls_per_s": report.lease_calls as f64 / report.elapsed_s.max(1e-9),
        "lease_p50_ms": report.lease_latency.p50_ms,
        "lease_p99_ms": report.lease_latency.p99_ms,
        "lease_max_ms": report.lease_latency.max_ms,
        "granted_p50_ms": report.granted_latency.p50_ms,
        "granted_p99_ms": report.granted_latency.p99_ms,
        "steps": report.steps,
        "trained": report.trained,
        "errors": report.errors,
        "first_errors": report.first_errors,
    });
    println!("{json}");
    if report.errors > 0 {
        bail!("{} calls failed during the benchmark (first: {:?})", report.errors, report.first_errors.first());
    }
    Ok(())
}
