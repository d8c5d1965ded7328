//! The heartbeat task: tells the coordinator the worker is alive and which version it holds,
//! renews open leases (dropping those the coordinator no longer honours), learns the newest
//! published version and whether the run is done.

use std::sync::Arc;

use crate::backoff::Backoff;
use crate::health::Progress;
use crate::metrics::WorkerMetrics;
use crate::session::{Session, is_unknown_worker, is_version_refused};
use crate::settings::WorkerTuning;
use crate::state::SharedState;
use crate::stop::Stop;

/// Heartbeats until stopped or the run is done.
pub async fn run(session: Arc<Session>, state: Arc<SharedState>, metrics: Arc<WorkerMetrics>, progress: Arc<Progress>, tuning: WorkerTuning, stop: Stop) {
    let mut backoff = Backoff::new(tuning.backoff_initial, tuning.backoff_max);
    loop {
        if stop.sleep(session.heartbeat_interval()).await || state.is_done() {
            return;
        }
        let asked = state.leases().renewable();
        let worker_id = session.worker_id();
        let held = state.held();
        match session.heartbeat(held, asked.clone()).await {
            Ok(reply) => {
                state.leases().renewed(&asked, &reply.valid_lease_ids, &reply.ttl_ms);
                state.set_published(reply.policy_version);
                metrics.versions(state.held(), state.published());
                if reply.done {
                    tracing::info!("the coordinator reports the run done");
                    state.set_done();
                }
                let dropped = asked.len().saturating_sub(reply.valid_lease_ids.len());
                if dropped > 0 {
                    tracing::warn!(dropped, "leases no longer valid at the coordinator; their work is dropped");
                }
            }
            Err(status) if is_unknown_worker(&status) => {
                if !session.reregister(&worker_id, &state, &mut backoff, &stop).await {
                    return;
                }
            }
            Err(status) if is_version_refused(&status) => {
                // The learner went back to an older checkpoint; the main loop refetches weights.
                tracing::warn!(message = status.message(), "the coordinator refused the version held");
                state.set_version_refused(held);
            }
            Err(status) => {
                progress.failed();
                tracing::warn!(code = ?status.code(), message = status.message(), "heartbeat failed");
            }
        }
    }
}
