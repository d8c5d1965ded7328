//! Starting and stopping a coordinator: `serve(config, prompts)` replays the journal, binds the
//! gRPC and metrics endpoints, starts the sweeper, and returns a handle to watch and stop it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use medrl_proto::metrics::{Scrape, serve_metrics};
use medrl_proto::server::{GrpcServer, ServerOptions, bind, join_tasks, listen, stop_signal};
use medrl_proto::v1::RunState;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic_health::ServingStatus;

use crate::config::CoordinatorConfig;
use crate::core::Core;
use crate::error::CoordinatorError;
use crate::images::ImageStore;
use crate::journal::{Journal, next_seq, replay};
use crate::metrics::Metrics;
use crate::prompts::PromptSet;
use crate::service::{CoordinatorService, Shared};
use crate::sweeper;

/// A running coordinator.
pub struct CoordinatorHandle {
    grpc_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    done: watch::Receiver<bool>,
    tasks: Vec<(&'static str, JoinHandle<Result<(), CoordinatorError>>)>,
}

/// Starts a coordinator for `prompts` (resuming its journal if there is one) and returns once
/// both endpoints are listening. Must be called inside a tokio runtime.
pub async fn serve(config: CoordinatorConfig, prompts: PromptSet) -> Result<CoordinatorHandle, CoordinatorError> {
    serve_with(config, prompts, ServerOptions::default()).await
}

/// Like [`serve`], with server options from the caller (the shared token, TLS); the message size
/// limit still comes from `config`.
pub async fn serve_with(config: CoordinatorConfig, prompts: PromptSet, options: ServerOptions) -> Result<CoordinatorHandle, CoordinatorError> {
    config.validate()?;
    let prompts = Arc::new(prompts);
    let (events, journal) = match &config.journal {
        Some(path) => {
            let events = replay(path)?;
            let journal = Journal::open(path, next_seq(&events))?;
            (events, journal)
        }
        None => (Vec::new(), Journal::in_memory()),
    };
    let journal_name = config.journal.clone().unwrap_or_else(|| PathBuf::from("<no journal>"));
    let (core, started) = Core::restore(&config, prompts.clone(), &events, &journal_name, Instant::now())?;
    journal.append(std::slice::from_ref(&started)).durable().await?;
    tracing::info!(
        run_id = core.run_id(),
        incarnation = core.incarnation(),
        replayed_events = events.len(),
        prompts = prompts.len(),
        journal = %journal_name.display(),
        "coordinator starting"
    );

    let (grpc_listener, grpc_addr) = bind(config.listen).await?;
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(listen(addr).await.map_err(|cause| CoordinatorError::Metrics { addr, cause })?),
        None => None,
    };

    let shared = Arc::new(Shared {
        core: Mutex::new(core),
        journal,
        images: ImageStore::new(&prompts, config.max_image_bytes),
        metrics: Metrics::new(),
        config: config.clone(),
    });

    let options = ServerOptions { max_message_bytes: config.max_message_bytes, ..options };
    let server = GrpcServer::new(&options)?;
    let health = server.health();
    sweeper::set_health(&health, ServingStatus::Serving).await;
    let server = server.with_coordinator(CoordinatorService::new(shared.clone()));

    let (shutdown, shutdown_rx) = watch::channel(false);
    let (done_tx, done) = watch::channel(false);
    let mut tasks: Vec<(&'static str, JoinHandle<Result<(), CoordinatorError>>)> = Vec::new();

    let signal = stop_signal(shutdown_rx.clone());
    tasks.push(("grpc", tokio::spawn(async move { server.serve(grpc_listener, signal).await.map_err(CoordinatorError::from) })));

    let mut metrics_addr = None;
    if let Some((listener, addr)) = metrics_listener {
        metrics_addr = Some(addr);
        let scrape = scrape_fn(shared.clone());
        let signal = stop_signal(shutdown_rx.clone());
        tasks.push((
            "metrics",
            tokio::spawn(async move {
                serve_metrics(listener, scrape, signal).await.map_err(|cause| CoordinatorError::Metrics { addr, cause })
            }),
        ));
    }

    let interval = Duration::from_secs_f64(config.reaper_interval_s);
    let sweeper_shared = shared.clone();
    tasks.push((
        "sweeper",
        tokio::spawn(async move {
            sweeper::run(sweeper_shared, health, interval, shutdown_rx, done_tx).await;
            Ok(())
        }),
    ));
    tracing::info!(%grpc_addr, metrics = ?metrics_addr, "coordinator listening");
    Ok(CoordinatorHandle { grpc_addr, metrics_addr, shared, shutdown, done, tasks })
}

fn scrape_fn(shared: Arc<Shared>) -> Scrape {
    Arc::new(move || {
        {
            let core = shared.core.lock().map_err(|_| "state lock poisoned".to_string())?;
            shared.metrics.refresh(&core);
        }
        shared.metrics.encode().map_err(|e| e.to_string())
    })
}

impl CoordinatorHandle {
    /// The bound gRPC address (the real port when the config asked for port 0).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The gRPC endpoint as a URI, e.g. `http://127.0.0.1:50051`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    /// The bound metrics address, when metrics are on.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The run's progress, read in process.
    pub fn run_state(&self) -> Option<RunState> {
        self.shared.core.lock().ok().map(|core| core.run_state(Instant::now()))
    }

    /// The metrics text, as `/metrics` would serve it.
    pub fn metrics_text(&self) -> Result<String, String> {
        scrape_fn(self.shared.clone())()
    }

    /// Resolves when every prompt of every epoch is finished.
    pub async fn wait_done(&self) {
        let mut done = self.done.clone();
        let _ = done.wait_for(|d| *d).await;
    }

    /// Serves until SIGINT or SIGTERM, or until the run is done and `linger` has passed (so that
    /// workers and the learner see `done` before the endpoint goes away), then shuts down. This
    /// is all a `medrl coordinator` command needs after [`serve`].
    pub async fn run_until_stopped(self, linger: Duration) -> Result<(), CoordinatorError> {
        let terminate = async {
            #[cfg(unix)]
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the coordinator");
                    std::future::pending::<()>().await;
                }
            }
            #[cfg(not(unix))]
            std::future::pending::<()>().await;
        };
        let finished = async {
            self.wait_done().await;
            tokio::time::sleep(linger).await;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; shutting down"),
            _ = terminate => tracing::info!("terminated; shutting down"),
            _ = finished => tracing::info!("run finished; shutting down"),
        }
        self.shutdown().await
    }

    /// Stops serving, waits for the tasks, and closes the journal (everything acknowledged is
    /// already on disk; closing only stops the writer).
    pub async fn shutdown(self) -> Result<(), CoordinatorError> {
        let _ = self.shutdown.send(true);
        let joined = join_tasks("coordinator", self.tasks, |name, e| CoordinatorError::Task(format!("{name}: {e}"))).await;
        self.shared.journal.close();
        tracing::info!("coordinator stopped");
        joined
    }
}
