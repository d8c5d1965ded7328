//! Starting and stopping the learner role: `serve_learner(settings, trainer)` joins the run,
//! starts the Learner and Weights services (with health and reflection), the metrics endpoint,
//! the health watchdog and the step loop, and returns a handle to watch and stop them.

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::thread::JoinHandle as ThreadHandle;

use medrl_proto::metrics::{Scrape, serve_metrics};
use medrl_proto::server::{GrpcServer, bind, join_tasks, listen, stop_signal};
use medrl_weight_sync::{PublisherOptions, WeightPublisher};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic_health::ServingStatus;
use tracing::Instrument;

use crate::service::consumed::{CONSUMED_LOG, ConsumedLog};
use crate::service::coordinator::CoordinatorRpc;
use crate::service::error::{ServiceError, ServiceResult};
use crate::service::health::{set_health, watch_health};
use crate::service::images::ImageStore;
use crate::service::settings::LearnerSettings;
use crate::service::startup::{publish_current, sync_with_coordinator};
use crate::service::state::{LearnerStatus, Phase, Shared};
use crate::service::step_loop::{LoopOutcome, LoopParts, StepLoop};
use crate::service::steplog::{METRICS_JSONL, StepLog};
use crate::service::submit::SubmitService;
use crate::service::validate::Limits;
use crate::trainer::Trainer;

type TaskResult = ServiceResult<()>;
type LoopResult = (Option<Trainer>, ServiceResult<LoopOutcome>);

/// A running learner.
pub struct LearnerHandle {
    grpc_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    publisher: WeightPublisher,
    stop_loop: watch::Sender<bool>,
    stop_servers: watch::Sender<bool>,
    outcome: watch::Receiver<Option<Result<LoopOutcome, String>>>,
    step_thread: ThreadHandle<LoopResult>,
    tasks: Vec<(&'static str, JoinHandle<TaskResult>)>,
}

/// Starts the learner role with `trainer` (fresh or resumed, see
/// [`crate::service::resume_or_new`]); returns once it has synced with the coordinator,
/// published its current weights and is listening. Must be called inside a multi-threaded tokio
/// runtime (the step loop's thread drives its calls through the runtime's handle).
pub async fn serve_learner(settings: LearnerSettings, trainer: Trainer) -> ServiceResult<LearnerHandle> {
    settings.validate()?;
    let span = tracing::info_span!("learner", run_dir = %settings.run_dir.display());
    start(settings, trainer).instrument(span).await
}

async fn start(settings: LearnerSettings, trainer: Trainer) -> ServiceResult<LearnerHandle> {
    let run_dir = settings.run_dir.clone();
    std::fs::create_dir_all(&run_dir).map_err(|e| ServiceError::io(&run_dir, e))?;
    let version = trainer.step;
    let (log, consumed) = ConsumedLog::open(&run_dir.join(CONSUMED_LOG), version)?;
    let steplog = StepLog::open(&run_dir.join(METRICS_JSONL))?;

    // Bind first: a taken port fails before anything is announced to the coordinator.
    let (grpc_listener, grpc_addr) = bind(settings.listen).await?;
    let metrics_listener = match settings.metrics_listen {
        Some(addr) => Some(listen(addr).await.map_err(|source| ServiceError::Metrics { addr, source })?),
        None => None,
    };

    let rpc = CoordinatorRpc::connect(&settings.coordinator, &settings.client, settings.rpc_timeout(), settings.coordinator_retry()).await?;
    sync_with_coordinator(&rpc, version, &consumed).await?;

    let publisher = WeightPublisher::new(PublisherOptions { chunk_bytes: settings.weight_chunk_bytes, max_wait: settings.weight_wait() })?;
    let weight_dtype = settings.weight_dtype.resolve(trainer.vlm.model.dtype());
    let (trainer, published) = publish_current(trainer, &publisher, weight_dtype).await?;
    rpc.publish_version(version, &published.sha256).await?;
    tracing::info!(version, bytes = published.blob.len(), sha256 = %published.sha256, "initial weights published");

    let limits = Limits {
        vocab_size: trainer.vlm.model.config.text.vocab_size,
        max_completions: settings.max_completions_per_group,
        max_sequence_tokens: settings.max_sequence_tokens,
        max_image_bytes: settings.max_image_bytes,
        placeholder_ids: trainer.vlm.model.config.placeholder_token_ids(),
    };
    let shared = Arc::new(Shared::new(version, consumed, limits, settings.max_staleness, settings.max_buffered_groups));
    let images = Arc::new(ImageStore::new(rpc.clone(), settings.image_cache_bytes, settings.max_image_bytes));

    let (stop_servers, servers_rx) = watch::channel(false);
    let (stop_loop, loop_rx) = watch::channel(false);
    let mut tasks: Vec<(&'static str, JoinHandle<TaskResult>)> = Vec::new();

    let server = GrpcServer::new(&settings.server)?;
    let health = server.health();
    set_health(&health, ServingStatus::Serving).await;
    let server = server.with_learner(SubmitService::new(shared.clone(), images.clone())).with_weights(publisher.clone());
    let signal = stop_signal(servers_rx.clone());
    tasks.push(("grpc", tokio::spawn(async move { server.serve(grpc_listener, signal).await.map_err(ServiceError::from) })));

    let mut metrics_addr = None;
    if let Some((listener, addr)) = metrics_listener {
        metrics_addr = Some(addr);
        let scrape_shared = shared.clone();
        let scrape: Scrape = Arc::new(move || scrape_shared.scrape());
        let signal = stop_signal(servers_rx.clone());
        tasks.push((
            "metrics",
            tokio::spawn(async move { serve_metrics(listener, scrape, signal).await.map_err(|source| ServiceError::Metrics { addr, source }) }),
        ));
    }

    let watchdog = watch_health(shared.clone(), health, settings.stall_timeout(), servers_rx);
    tasks.push((
        "health",
        tokio::spawn(async move {
            watchdog.await;
            Ok(())
        }),
    ));

    let (outcome_tx, outcome) = watch::channel(None);
    let parts = LoopParts {
        trainer,
        shared: shared.clone(),
        settings,
        rpc,
        images,
        publisher: publisher.clone(),
        log,
        steplog,
        runtime: tokio::runtime::Handle::current(),
        stop: loop_rx,
        weight_dtype,
    };
    let step_thread = std::thread::Builder::new()
        .name("medrl-learner-steps".into())
        .spawn(move || {
            let loop_shared = parts.shared.clone();
            // A panic must not leave health at SERVING and wait_done waiting forever. The trainer
            // is lost with the panic; the state it would have saved is the last checkpoint.
            let (trainer, result) = match std::panic::catch_unwind(AssertUnwindSafe(|| StepLoop::new(parts).run())) {
                Ok((trainer, result)) => (Some(trainer), result),
                Err(panic) => {
                    let message = panic_message(panic.as_ref());
                    tracing::error!(%message, "the step loop panicked");
                    loop_shared.set_phase(Phase::Failed(format!("panicked: {message}")));
                    (None, Err(ServiceError::Stopped(format!("the step loop panicked: {message}"))))
                }
            };
            let _ = outcome_tx.send(Some(result.as_ref().map(Clone::clone).map_err(ToString::to_string)));
            (trainer, result)
        })
        .map_err(|e| ServiceError::Stopped(format!("cannot start the step thread: {e}")))?;
    tracing::info!(%grpc_addr, metrics = ?metrics_addr, version, "learner listening");
    Ok(LearnerHandle { grpc_addr, metrics_addr, shared, publisher, stop_loop, stop_servers, outcome, step_thread, tasks })
}

/// The text of a panic payload (`&str` or `String`), for the error it becomes.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

impl LearnerHandle {
    /// The bound gRPC address (the real port when the settings asked for port 0).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The gRPC endpoint as a URI, e.g. `http://127.0.0.1:50052`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    /// The bound metrics address, when metrics are on.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// A snapshot of the learner.
    pub fn state(&self) -> ServiceResult<LearnerStatus> {
        self.shared.status()
    }

    /// The Weights service's state (the newest published version).
    pub fn publisher(&self) -> &WeightPublisher {
        &self.publisher
    }

    /// The metrics text, as `/metrics` serves it.
    pub fn metrics_text(&self) -> Result<String, String> {
        self.shared.scrape()
    }

    /// Resolves when the step loop has ended: the run finished (final checkpoint and model
    /// written), it was stopped, or it failed.
    pub async fn wait_done(&self) -> ServiceResult<LoopOutcome> {
        let mut rx = self.outcome.clone();
        let outcome = rx.wait_for(Option::is_some).await.map_err(|_| ServiceError::Stopped("the step loop ended without an outcome (it panicked?)".into()))?;
        match outcome.as_ref() {
            Some(Ok(o)) => Ok(o.clone()),
            Some(Err(e)) => Err(ServiceError::Stopped(e.clone())),
            None => Err(ServiceError::Stopped("no outcome".into())),
        }
    }

    /// Stops the step loop (after its current step, checkpointing what is not saved yet), then the
    /// servers; returns the trainer. A loop that had failed returns its error instead.
    pub async fn shutdown(self) -> ServiceResult<Trainer> {
        let _ = self.stop_loop.send(true);
        let thread = self.step_thread;
        let joined = tokio::task::spawn_blocking(move || thread.join()).await;
        let _ = self.stop_servers.send(true);
        let tasks = join_tasks("learner", self.tasks, |name, e| ServiceError::Stopped(format!("{name} task: {e}"))).await;
        let (trainer, result) = match joined {
            Ok(Ok(pair)) => pair,
            Ok(Err(_)) => return Err(ServiceError::Stopped("the step loop panicked".into())),
            Err(e) => return Err(ServiceError::Stopped(format!("joining the step loop: {e}"))),
        };
        result?;
        tasks?;
        tracing::info!("learner stopped");
        trainer.ok_or_else(|| ServiceError::Stopped("the step loop lost the trainer".into()))
    }
}
