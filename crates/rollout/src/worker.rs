//! The worker's life: start its endpoints, load the model, connect and register, then loop —
//! update weights between groups, lease prompts, fetch their images, sample and score each
//! group on a blocking thread, hand groups to delivery tasks that ack the lease — until the
//! coordinator says the run is done or shutdown is asked for.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use medrl_proto::ClientOptions;
use medrl_proto::client::AuthedChannel;
use medrl_proto::v1::learner_client::LearnerClient;
use medrl_proto::v1::{Lease, LeasedPrompt, WorkerCapabilities};
use tokio::task::{JoinHandle, JoinSet};
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::connect::connect_retrying;
use crate::deliver::deliver;
use crate::error::{PromptError, WorkerError};
use crate::health::{self, Progress};
use crate::heartbeat;
use crate::images::{ImageCache, fetch_images};
use crate::lease::{self, ClosingLease, LeaseReport, PendingGroup};
use crate::metrics::{self, WorkerMetrics};
use crate::policy::Policy;
use crate::prompt::parse_record;
use crate::sample::{GroupJob, GroupSettings};
use crate::session::{Session, is_unknown_worker, is_version_refused};
use crate::settings::{WorkerSettings, WorkerTuning};
use crate::state::SharedState;
use crate::stats::WorkerStats;
use crate::stop::{Stop, StopSender, stop_signal};
use crate::weights::{UpdateOutcome, WeightUpdater};

/// Bounds on how long to wait when the coordinator says "ask again later".
const MIN_RETRY_AFTER: Duration = Duration::from_millis(10);
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Runs a rollout worker until the coordinator reports the run done (or `shutdown` resolves),
/// and returns what it did. On shutdown, groups already sampled are still delivered and acked
/// within `tuning.drain_timeout`.
pub async fn run_worker(settings: WorkerSettings, shutdown: impl Future<Output = ()>) -> Result<WorkerStats, WorkerError> {
    settings.rollout.validate()?;
    settings.rewards.validate()?;
    let (stop_tx, stop) = stop_signal();
    let span = tracing::info_span!("rollout_worker", name = %settings.name);
    let body = run(settings, &stop_tx, stop).instrument(span);
    tokio::pin!(body);
    tokio::pin!(shutdown);
    tokio::select! {
        result = &mut body => result,
        _ = &mut shutdown => {
            tracing::info!("shutdown requested");
            stop_tx.stop();
            body.await
        }
    }
}

/// Tasks that live as long as the worker: endpoints and heartbeats.
struct Background {
    tasks: Vec<(&'static str, JoinHandle<()>)>,
}

impl Background {
    async fn finish(self, within: Duration) {
        for (name, task) in self.tasks {
            let abort = task.abort_handle();
            match tokio::time::timeout(within, task).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) if e.is_cancelled() => {}
                Ok(Err(e)) => tracing::error!(task = name, error = %e, "background task failed"),
                Err(_) => {
                    tracing::warn!(task = name, "background task did not stop in time; aborting it");
                    abort.abort();
                }
            }
        }
    }
}

async fn start_endpoints(settings: &WorkerSettings, metrics: &Arc<WorkerMetrics>, progress: &Arc<Progress>, stop: &Stop) -> Result<Background, WorkerError> {
    let mut tasks = Vec::new();
    if let Some(addr) = settings.metrics_listen {
        let (listener, local) =
            metrics::bind(addr).await.map_err(|e| WorkerError::Serve { what: "metrics", addr, cause: e.to_string() })?;
        let (metrics, stop) = (metrics.clone(), stop.clone());
        tasks.push((
            "metrics",
            tokio::spawn(async move {
                if let Err(e) = metrics::serve(listener, metrics, async move { stop.wait().await }).await {
                    tracing::error!(error = %e, "metrics endpoint failed");
                }
            }),
        ));
        tracing::info!(%local, "metrics endpoint listening");
    }
    if let Some(addr) = settings.health_listen {
        let (_, task) = health::start(addr, progress.clone(), settings.tuning.stall_after, stop.clone()).await?;
        tasks.push(("health", task));
    }
    Ok(Background { tasks })
}

fn client_options(settings: &WorkerSettings, request_timeout: Option<Duration>) -> ClientOptions {
    ClientOptions {
        connect_timeout: settings.tuning.connect_timeout,
        request_timeout,
        max_message_bytes: settings.tuning.max_message_bytes,
        auth: settings.auth.clone(),
        tls: settings.tls.clone(),
        ..ClientOptions::default()
    }
}

async fn run(settings: WorkerSettings, stop_tx: &StopSender, stop: Stop) -> Result<WorkerStats, WorkerError> {
    let metrics = Arc::new(WorkerMetrics::new());
    let progress = Arc::new(Progress::default());
    // Endpoints first, so probes get an answer (NOT_SERVING) while the model loads.
    let mut background = start_endpoints(&settings, &metrics, &progress, &stop).await?;
    let tuning = settings.tuning.clone();
    let result = run_registered(settings, &metrics, &progress, &mut background, &stop).await;
    progress.set_ready(false);
    stop_tx.stop();
    background.finish(tuning.drain_timeout).await;
    result
}

async fn run_registered(
    settings: WorkerSettings,
    metrics: &Arc<WorkerMetrics>,
    progress: &Arc<Progress>,
    background: &mut Background,
    stop: &Stop,
) -> Result<WorkerStats, WorkerError> {
    let tuning = settings.tuning.clone();
    let policy = Policy::load(&settings.model_dir, settings.dtype, &settings.device).await?;
    tracing::info!(dir = %settings.model_dir.display(), device = ?settings.device, dtype = ?settings.dtype, "model loaded");

    let mut backoff = Backoff::new(tuning.backoff_initial, tuning.backoff_max);
    let unary = client_options(&settings, Some(tuning.call_timeout));
    let Some(coordinator) = connect_retrying("coordinator", &settings.coordinator, &unary, &mut backoff, stop).await? else {
        return Ok(WorkerStats::default());
    };
    let capabilities = WorkerCapabilities {
        device: format!("{:?}", settings.device),
        group_size: settings.rollout.group_size,
        max_prompts: settings.rollout.prompts_per_lease,
        weight_transports: vec!["grpc".into()],
    };
    let session = Arc::new(Session::new(unary.coordinator(coordinator), &settings.name, capabilities));
    let state = Arc::new(SharedState::new(policy.version()));
    if !session.register(&state, &mut backoff, stop).await {
        return Ok(WorkerStats::default());
    }
    let Some(learner) = connect_retrying("learner", &settings.learner, &unary, &mut backoff, stop).await? else {
        return Ok(WorkerStats { registrations: session.registrations(), ..WorkerStats::default() });
    };
    // Weight downloads are long streams: no channel-wide deadline, fetch_weights sets its own.
    let weights = client_options(&settings, None).weights(learner.clone());
    let learner = unary.learner(learner);
    progress.set_ready(true);
    metrics.versions(state.held(), state.published());

    let (hb_session, hb_state, hb_metrics, hb_progress, hb_tuning, hb_stop) =
        (session.clone(), state.clone(), metrics.clone(), progress.clone(), tuning.clone(), stop.clone());
    background.tasks.push((
        "heartbeat",
        tokio::spawn(heartbeat::run(hb_session, hb_state, hb_metrics, hb_progress, hb_tuning, hb_stop).in_current_span()),
    ));

    let mut worker = Worker {
        prompts_per_lease: settings.rollout.prompts_per_lease,
        group_settings: Arc::new(settings.group_settings()),
        session,
        learner,
        updater: WeightUpdater::new(weights, &tuning),
        policy,
        state,
        metrics: metrics.clone(),
        progress: progress.clone(),
        images: ImageCache::new(tuning.image_cache_bytes),
        closing: JoinSet::new(),
        stats: WorkerStats::default(),
        backoff,
        stop: stop.clone(),
        tuning,
    };
    worker.run_loop().await;
    Ok(worker.finish().await)
}

/// What one LeasePrompts call came to.
enum LeaseStep {
    /// Prompts to work on, with the worker id they were granted to.
    Granted(Lease, String),
    /// Nothing now; ask again after this long.
    Wait(Duration),
    /// The call failed and was dealt with; go round again.
    Retry,
    /// The run is finished.
    Done,
}

/// The main loop's state.
struct Worker {
    prompts_per_lease: u32,
    group_settings: Arc<GroupSettings>,
    session: Arc<Session>,
    learner: LearnerClient<AuthedChannel>,
    updater: WeightUpdater,
    policy: Policy,
    state: Arc<SharedState>,
    metrics: Arc<WorkerMetrics>,
    progress: Arc<Progress>,
    images: ImageCache,
    closing: JoinSet<LeaseReport>,
    stats: WorkerStats,
    backoff: Backoff,
    stop: Stop,
    tuning: WorkerTuning,
}

impl Worker {
    fn should_stop(&self) -> bool {
        self.stop.is_set() || self.state.is_done()
    }

    fn record(&mut self, joined: Result<LeaseReport, tokio::task::JoinError>) {
        match joined {
            Ok(report) => self.stats.add_lease(&report),
            Err(e) if e.is_cancelled() => {}
            Err(e) => tracing::error!(error = %e, "lease closing task failed"),
        }
    }

    async fn run_loop(&mut self) {
        loop {
            while let Some(joined) = self.closing.try_join_next() {
                self.record(joined);
            }
            if self.should_stop() {
                return;
            }
            // Backpressure: sampling runs ahead of delivery by a bounded number of leases.
            while self.closing.len() >= self.tuning.max_pending_leases.max(1) {
                let joined = tokio::select! {
                    joined = self.closing.join_next() => joined,
                    _ = self.stop.wait() => return,
                };
                if let Some(joined) = joined {
                    self.record(joined);
                }
            }
            // Between groups: take a newer published version before asking for more work.
            self.update_weights(self.state.published(), false).await;
            if self.should_stop() {
                return;
            }
            match self.lease_once().await {
                LeaseStep::Granted(lease, worker_id) => self.work_lease(lease, worker_id).await,
                LeaseStep::Wait(delay) => {
                    if self.stop.sleep(delay).await {
                        return;
                    }
                }
                LeaseStep::Retry => {}
                LeaseStep::Done => {
                    tracing::info!("the coordinator reports the run done");
                    self.state.set_done();
                    return;
                }
            }
        }
    }

    async fn update_weights(&mut self, target: u64, required: bool) {
        let outcome = self.updater.update(&mut self.policy, target, required, &self.state, &self.metrics, &self.stop).await;
        match outcome {
            UpdateOutcome::Installed(version) => {
                self.state.set_held(version);
                self.stats.weight_updates += 1;
                self.progress.ok();
            }
            UpdateOutcome::Failed => self.progress.failed(),
            UpdateOutcome::Current | UpdateOutcome::Deferred | UpdateOutcome::Withdrawn => {}
        }
        self.metrics.versions(self.state.held(), self.state.published());
    }

    async fn lease_once(&mut self) -> LeaseStep {
        let worker_id = self.session.worker_id();
        let started = Instant::now();
        let held = self.policy.version();
        let result = self.session.lease(self.prompts_per_lease, held).await;
        self.metrics.lease_latency.observe(started.elapsed().as_secs_f64());
        match result {
            Ok(reply) => {
                self.progress.ok();
                self.backoff.reset();
                if reply.done {
                    return LeaseStep::Done;
                }
                match reply.lease.filter(|l| !l.prompts.is_empty()) {
                    Some(lease) => LeaseStep::Granted(lease, worker_id),
                    None => LeaseStep::Wait(Duration::from_millis(reply.retry_after_ms).clamp(MIN_RETRY_AFTER, MAX_RETRY_AFTER)),
                }
            }
            Err(status) if is_unknown_worker(&status) => {
                let (session, state) = (self.session.clone(), self.state.clone());
                if session.reregister(&worker_id, &state, &mut self.backoff, &self.stop).await {
                    self.stats.registrations = self.session.registrations();
                }
                LeaseStep::Retry
            }
            Err(status) if is_version_refused(&status) => {
                tracing::warn!(message = status.message(), "the coordinator refused the version held; refetching weights");
                self.state.set_version_refused(held);
                // Paced like any failure: the learner may serve nothing until it has restarted.
                self.progress.failed();
                self.stop.sleep(self.backoff.next_delay()).await;
                LeaseStep::Retry
            }
            Err(status) => {
                self.progress.failed();
                let delay = self.backoff.next_delay();
                tracing::warn!(code = ?status.code(), message = status.message(), retry_in = ?delay, "leasing failed");
                self.stop.sleep(delay).await;
                LeaseStep::Retry
            }
        }
    }

    async fn work_lease(&mut self, lease: Lease, worker_id: String) {
        let span = tracing::info_span!("lease", lease = %lease.lease_id, epoch = lease.epoch, version = lease.policy_version);
        async {
            self.state.set_published(lease.policy_version);
            self.state.leases().open(&lease.lease_id, Duration::from_millis(lease.ttl_ms));
            self.stats.leases += 1;
            self.stats.prompts += lease.prompts.len() as u64;
            tracing::debug!(prompts = lease.prompts.len(), ttl_ms = lease.ttl_ms, "lease granted");
            let mut groups = Vec::with_capacity(lease.prompts.len());
            for prompt in &lease.prompts {
                if self.should_stop() {
                    break;
                }
                // Between groups, never inside one: the lease's version first, or a newer one.
                let required = lease.policy_version > self.policy.version();
                self.update_weights(lease.policy_version.max(self.state.published()), required).await;
                // Checked after the update: a learner restart that withdrew the lease's version
                // also expired the lease, and the heartbeat that ended the update said so.
                if !self.state.leases().is_live(&lease.lease_id) {
                    tracing::warn!("the lease is no longer valid; its remaining prompts are left");
                    break;
                }
                match self.sample(&lease, prompt, &worker_id).await {
                    Ok(Some(pending)) => groups.push(pending),
                    Ok(None) => break,
                    Err(e) => {
                        self.stats.prompts_failed += 1;
                        self.metrics.prompts_failed.inc();
                        tracing::error!(error = %e, "prompt not sampled; it goes back to the queue");
                    }
                }
            }
            let closing = ClosingLease { lease_id: lease.lease_id.clone(), worker_id, prompts: lease.prompts.len(), groups };
            let close = lease::close(closing, self.session.clone(), self.state.clone(), self.metrics.clone(), self.progress.clone(), self.tuning.clone());
            self.closing.spawn(close.in_current_span());
        }
        .instrument(span)
        .await
    }

    /// Samples one prompt's group and starts its delivery; `None` when stopped meanwhile.
    async fn sample(&mut self, lease: &Lease, prompt: &LeasedPrompt, worker_id: &str) -> Result<Option<PendingGroup>, PromptError> {
        let span = tracing::info_span!("group", prompt = %prompt.prompt_id, attempt = prompt.attempt);
        async {
            let record = parse_record(&prompt.prompt_id, &prompt.record_json)?;
            if record.images.len() != prompt.images.len() {
                return Err(PromptError::ImageCount { prompt_id: prompt.prompt_id.clone(), record: record.images.len(), leased: prompt.images.len() });
            }
            let images = fetch_images(&self.session, &mut self.images, &prompt.images, self.tuning.max_image_bytes).await?;
            let job = GroupJob { epoch: lease.epoch, lease_id: lease.lease_id.clone(), worker_id: worker_id.to_string(), prompt: prompt.clone(), record, images };
            // Shutdown does not wait for a group being sampled (minutes for a large model): its
            // thread finishes on its own and the result is dropped; the lease will expire.
            let sampled = tokio::select! {
                sampled = self.policy.sample(job, self.group_settings.clone()) => sampled?,
                _ = self.stop.wait() => return Ok(None),
            };
            self.stats.groups_sampled += 1;
            self.stats.completion_tokens += sampled.completion_tokens as u64;
            self.metrics.tokens.inc_by(sampled.completion_tokens as u64);
            let secs = sampled.elapsed.as_secs_f64();
            if secs > 0.0 {
                self.metrics.tokens_per_second.set(sampled.completion_tokens as f64 / secs);
            }
            tracing::info!(
                group_id = %sampled.group.group_id,
                tokens = sampled.completion_tokens,
                seconds = secs,
                pass_rate = ?sampled.pass_rate,
                version = sampled.group.policy_version,
                "group sampled"
            );
            let delivery = deliver(self.learner.clone(), sampled.group, self.state.clone(), self.metrics.clone(), self.progress.clone(), self.tuning.clone());
            let handle = tokio::spawn(delivery.in_current_span());
            Ok(Some(PendingGroup { prompt_id: prompt.prompt_id.clone(), pass_rate: sampled.pass_rate, delivery: handle }))
        }
        .instrument(span)
        .await
    }

    /// Settles leases still closing: abandoned when the run is done (everything is trained),
    /// otherwise given up to the drain timeout to deliver and ack.
    async fn finish(mut self) -> WorkerStats {
        if self.state.is_done() {
            self.stats.run_done = true;
            self.closing.abort_all();
        }
        let deadline = tokio::time::Instant::now() + self.tuning.drain_timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.closing.join_next()).await {
                Ok(Some(joined)) => self.record(joined),
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!(leases = self.closing.len(), "drain timeout: leaving unacked leases to expire");
                    self.closing.abort_all();
                }
            }
        }
        self.stats.registrations = self.session.registrations();
        self.stats.policy_version = self.policy.version();
        self.stats.weight_failures = self.updater.failed_tries();
        self.stats
    }
}
