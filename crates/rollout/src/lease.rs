//! Closing a lease: wait for each of its groups to be delivered (or given up), then ack the
//! lease once, naming only the prompts the learner accepted or already held, with their pass
//! rates. Prompts left out go back to the coordinator's queue when the lease closes.

use std::sync::Arc;

use medrl_proto::v1::DeliveredPrompt;
use tokio::task::JoinHandle;
use tonic::Code;

use crate::backoff::Backoff;
use crate::deliver::Delivery;
use crate::health::Progress;
use crate::metrics::WorkerMetrics;
use crate::session::Session;
use crate::settings::WorkerTuning;
use crate::state::SharedState;

/// Ack tries on transient errors before the lease is left to expire.
const ACK_TRIES: u32 = 6;

/// A sampled group on its way to the learner. Dropping it stops its delivery task, so a lease
/// abandoned at exit leaves no task retrying behind.
#[derive(Debug)]
pub struct PendingGroup {
    /// The prompt it answers.
    pub prompt_id: String,
    /// Its pass rate, reported with the ack.
    pub pass_rate: Option<f32>,
    /// The delivery task.
    pub delivery: JoinHandle<Delivery>,
}

impl Drop for PendingGroup {
    fn drop(&mut self) {
        self.delivery.abort();
    }
}

/// A lease whose prompts have all been sampled (or failed) and whose groups are in delivery.
#[derive(Debug)]
pub struct ClosingLease {
    /// Lease id.
    pub lease_id: String,
    /// The worker id the lease was granted to.
    pub worker_id: String,
    /// Prompts in the lease.
    pub prompts: usize,
    /// Groups in delivery.
    pub groups: Vec<PendingGroup>,
}

/// What became of a lease.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseReport {
    /// Groups the learner accepted.
    pub accepted: u64,
    /// Groups the learner already had.
    pub duplicate: u64,
    /// Groups refused as stale.
    pub stale: u64,
    /// Groups refused as malformed.
    pub invalid: u64,
    /// Groups never answered for.
    pub undelivered: u64,
    /// True when the AckLease call succeeded.
    pub acked: bool,
    /// Prompts the coordinator newly marked delivered.
    pub newly_delivered: u64,
    /// Prompts the coordinator already had as delivered or trained.
    pub ack_duplicates: u64,
    /// Prompts the ack sent back to the queue.
    pub requeued: u64,
}

/// Waits for the lease's deliveries and acks it.
pub async fn close(
    lease: ClosingLease,
    session: Arc<Session>,
    state: Arc<SharedState>,
    metrics: Arc<WorkerMetrics>,
    progress: Arc<Progress>,
    tuning: WorkerTuning,
) -> LeaseReport {
    let mut report = LeaseReport::default();
    let mut delivered = Vec::new();
    for mut group in lease.groups {
        let outcome = (&mut group.delivery).await.unwrap_or_else(|e| {
            tracing::error!(prompt = %group.prompt_id, error = %e, "delivery task failed");
            Delivery::Undelivered
        });
        metrics.group(outcome.label());
        match outcome {
            Delivery::Accepted => report.accepted += 1,
            Delivery::Duplicate => report.duplicate += 1,
            Delivery::Stale => report.stale += 1,
            Delivery::Invalid => report.invalid += 1,
            Delivery::Undelivered => report.undelivered += 1,
        }
        if outcome.reached_learner() {
            delivered.push(DeliveredPrompt { prompt_id: group.prompt_id.clone(), pass_rate: group.pass_rate });
        }
    }
    let mut backoff = Backoff::new(tuning.backoff_initial, tuning.backoff_max);
    for attempt in 1..=ACK_TRIES {
        match session.ack(&lease.lease_id, &lease.worker_id, delivered.clone()).await {
            Ok(reply) => {
                progress.ok();
                report.acked = true;
                report.newly_delivered = u64::from(reply.delivered);
                report.ack_duplicates = u64::from(reply.duplicate);
                report.requeued = u64::from(reply.requeued);
                tracing::info!(
                    delivered = reply.delivered,
                    duplicate = reply.duplicate,
                    requeued = reply.requeued,
                    late = reply.late,
                    prompts = lease.prompts,
                    "lease acked"
                );
                break;
            }
            Err(status) if matches!(status.code(), Code::NotFound | Code::InvalidArgument | Code::FailedPrecondition) => {
                // The coordinator forgot the lease (restart) or refuses it: retrying cannot help;
                // the prompts are back in its queue already or will be when the lease expires.
                tracing::warn!(code = ?status.code(), message = status.message(), "lease ack refused");
                break;
            }
            Err(status) => {
                progress.failed();
                let delay = backoff.next_delay();
                tracing::warn!(attempt, code = ?status.code(), message = status.message(), retry_in = ?delay, "lease ack failed");
                if attempt < ACK_TRIES {
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
    state.leases().close(&lease.lease_id);
    report
}
