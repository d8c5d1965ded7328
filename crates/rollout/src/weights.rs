//! Weight updates between groups: when the coordinator reports a newer policy version than the
//! one held, fetch it from the learner's Weights service, verify and decode it, and rebuild the
//! model. A failed or corrupt update keeps the old weights and is retried with backoff.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use medrl_proto::client::AuthedChannel;
use medrl_proto::v1::weights_client::WeightsClient;
use medrl_weight_sync::FetchOptions;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::error::WeightError;
use crate::metrics::WorkerMetrics;
use crate::policy::Policy;
use crate::settings::WorkerTuning;
use crate::state::SharedState;
use crate::stop::Stop;

/// Fetches and installs new weights, remembering failures so they are retried with backoff.
pub struct WeightUpdater {
    client: WeightsClient<AuthedChannel>,
    options: FetchOptions,
    /// The last installed blob's memory, written over by the next fetch: already-mapped pages
    /// spare a fetch the page faults of fresh memory, which cost more than the copy into them.
    /// The worker thus keeps one blob's worth of host memory between updates (16.6 GB for a
    /// bf16 7B model): on a GPU worker the host peak every update reached anyway; on a CPU
    /// worker one blob more at the peak, while the model is built.
    spare: BytesMut,
    backoff: Backoff,
    retry_at: Option<Instant>,
    tries_when_required: u32,
    failed_tries: u64,
}

/// What an update attempt did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateOutcome {
    /// Nothing to do: the held version is new enough.
    Current,
    /// A failed update is waiting out its backoff.
    Deferred,
    /// Weights of this version were installed.
    Installed(u64),
    /// Every try failed; the old weights stay.
    Failed,
    /// The coordinator withdrew the target version during the update; the old weights stay.
    Withdrawn,
}

impl WeightUpdater {
    /// An updater over a Weights client.
    pub fn new(client: WeightsClient<AuthedChannel>, tuning: &WorkerTuning) -> Self {
        WeightUpdater {
            client,
            options: FetchOptions { timeout: tuning.weight_fetch_timeout, ..FetchOptions::default() },
            spare: BytesMut::new(),
            backoff: Backoff::new(tuning.backoff_initial, tuning.backoff_max),
            retry_at: None,
            tries_when_required: tuning.weight_tries_per_group.max(1),
            failed_tries: 0,
        }
    }

    /// One fetch, verify, decode and install of a version `>= min_version`; given up once the
    /// coordinator withdraws that version (the learner would hold the stream open waiting for it).
    async fn try_once(&mut self, policy: &mut Policy, min_version: u64, state: &SharedState, metrics: &WorkerMetrics) -> Result<u64, WeightError> {
        let started = Instant::now();
        let buffer = std::mem::take(&mut self.spare);
        let fetch = medrl_weight_sync::fetch_weights_with(self.client.clone(), min_version, &self.options, buffer);
        let fetched = tokio::select! {
            fetched = fetch => fetched.map_err(|cause| WeightError::Fetch { min_version, cause })?,
            _ = state.withdrawn(min_version) => return Err(WeightError::Withdrawn { min_version, published: state.published() }),
        };
        if fetched.version < min_version {
            return Err(WeightError::Older { min_version, served: fetched.version });
        }
        let version = fetched.version;
        let bytes = fetched.blob.len();
        let blob = policy.install(version, fetched.blob).await?;
        self.spare = medrl_weight_sync::reusable_buffer(blob);
        let seconds = started.elapsed().as_secs_f64();
        metrics.weight_fetch.observe(seconds);
        tracing::info!(version, bytes, seconds, "new weights installed");
        Ok(version)
    }

    /// Brings `policy` to version `target` or newer, if it holds an older one. `required` means a
    /// lease asks for that version: then up to the configured number of tries are made now, with
    /// backoff between them. Otherwise one try is made if no failure's backoff is pending.
    /// After the coordinator refused the held version as nonexistent (`state`'s refusal flag), it
    /// takes whatever version the learner serves now, even an older one, and keeps the flag while
    /// that fails. A target the coordinator withdraws meanwhile (`state`'s published version drops
    /// below it) ends the update with no backoff.
    pub async fn update(&mut self, policy: &mut Policy, target: u64, required: bool, state: &SharedState, metrics: &WorkerMetrics, stop: &Stop) -> UpdateOutcome {
        // A refusal only matters if it was of the version still held: a heartbeat sent just
        // before a refetch may report the old version after the new one is installed.
        let refetch = state.take_version_refused().is_some_and(|refused| refused == policy.version());
        if !refetch && policy.version() >= target {
            return UpdateOutcome::Current;
        }
        if !required && !refetch && self.retry_at.is_some_and(|at| Instant::now() < at) {
            return UpdateOutcome::Deferred;
        }
        let min_version = if refetch { 0 } else { target };
        let tries = if required { self.tries_when_required } else { 1 };
        let span = tracing::info_span!("weight_update", held = policy.version(), target, required);
        let outcome = self.try_up_to(tries, policy, min_version, state, metrics, stop).instrument(span).await;
        if refetch && outcome == UpdateOutcome::Failed {
            // Keep asking until the coordinator accepts the version held.
            state.set_version_refused(policy.version());
        }
        outcome
    }

    async fn try_up_to(&mut self, tries: u32, policy: &mut Policy, min_version: u64, state: &SharedState, metrics: &WorkerMetrics, stop: &Stop) -> UpdateOutcome {
        for attempt in 1..=tries {
            match self.try_once(policy, min_version, state, metrics).await {
                Ok(version) => {
                    self.backoff.reset();
                    self.retry_at = None;
                    return UpdateOutcome::Installed(version);
                }
                Err(e @ WeightError::Withdrawn { .. }) => {
                    tracing::warn!(error = %e, "weight update abandoned; keeping version {}", policy.version());
                    return UpdateOutcome::Withdrawn;
                }
                Err(e) => {
                    self.failed_tries += 1;
                    metrics.weight_failures.inc();
                    let delay = self.backoff.next_delay();
                    self.retry_at = Some(Instant::now() + delay);
                    tracing::warn!(attempt, error = %e, retry_in = ?delay, "weight update failed; keeping version {}", policy.version());
                    if attempt < tries && stop.sleep(delay).await {
                        break;
                    }
                }
            }
        }
        UpdateOutcome::Failed
    }

    /// Fetch tries that failed so far (each left the old weights in place).
    pub fn failed_tries(&self) -> u64 {
        self.failed_tries
    }

    /// Delay before the next try after the latest failure, for logs and tests.
    pub fn pending_retry(&self) -> Option<Duration> {
        self.retry_at.map(|at| at.saturating_duration_since(Instant::now()))
    }
}
