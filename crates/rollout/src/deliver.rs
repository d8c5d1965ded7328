//! Delivering one group to the learner's `SubmitGroups`: retried with backoff while the lease can
//! still count, and classified by the learner's answer, because only accepted or duplicate groups
//! may be acked to the coordinator.

use std::sync::Arc;

use medrl_proto::client::AuthedChannel;
use medrl_proto::v1::learner_client::LearnerClient;
use medrl_proto::v1::{RolloutGroup, SubmitGroupsResponse};
use tonic::{Code, Status};

use crate::backoff::Backoff;
use crate::health::Progress;
use crate::metrics::WorkerMetrics;
use crate::settings::WorkerTuning;
use crate::state::SharedState;

/// How a group ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The learner took it for training.
    Accepted,
    /// The learner already held or trained this group or prompt (a retry that had arrived).
    Duplicate,
    /// Refused as older than the learner's staleness bound.
    Stale,
    /// Refused as malformed.
    Invalid,
    /// Never answered for: the lease lapsed, or the learner refused the call for good.
    Undelivered,
}

impl Delivery {
    /// True when the group is with the learner, so the prompt may be acked as delivered.
    pub fn reached_learner(self) -> bool {
        matches!(self, Delivery::Accepted | Delivery::Duplicate)
    }

    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Delivery::Accepted => "accepted",
            Delivery::Duplicate => "duplicate",
            Delivery::Stale => "stale",
            Delivery::Invalid => "invalid",
            Delivery::Undelivered => "undelivered",
        }
    }
}

/// Reads the learner's answer for a stream that carried exactly one group.
pub fn classify(reply: &SubmitGroupsResponse) -> Result<Delivery, String> {
    let counts = [reply.accepted, reply.duplicate, reply.stale, reply.invalid];
    // The answer comes from a peer: counts that do not describe one group are not guessed at.
    if counts.iter().map(|&c| u64::from(c)).sum::<u64>() != 1 {
        return Err(format!(
            "one group sent, but the learner counted accepted={} duplicate={} stale={} invalid={}",
            reply.accepted, reply.duplicate, reply.stale, reply.invalid
        ));
    }
    Ok(if reply.accepted == 1 {
        Delivery::Accepted
    } else if reply.duplicate == 1 {
        Delivery::Duplicate
    } else if reply.stale == 1 {
        Delivery::Stale
    } else {
        Delivery::Invalid
    })
}

/// Errors that no retry can fix: the call itself is wrong or not allowed.
fn is_permanent(status: &Status) -> bool {
    matches!(status.code(), Code::InvalidArgument | Code::Unauthenticated | Code::PermissionDenied | Code::Unimplemented)
}

/// Sends `group` until the learner answers for it, the lease stops counting, or the learner
/// refuses the call for good. The caller instruments it with the group's span.
pub async fn deliver(
    client: LearnerClient<AuthedChannel>,
    group: RolloutGroup,
    state: Arc<SharedState>,
    metrics: Arc<WorkerMetrics>,
    progress: Arc<Progress>,
    tuning: WorkerTuning,
) -> Delivery {
    let mut backoff = Backoff::new(tuning.backoff_initial, tuning.backoff_max);
    loop {
        if !state.leases().is_live(&group.lease_id) {
            tracing::warn!(lease = %group.lease_id, "lease no longer valid; the group is dropped undelivered");
            return Delivery::Undelivered;
        }
        let result = client.clone().submit_groups(tokio_stream::once(group.clone())).await;
        let failure = match result {
            Ok(reply) => match classify(reply.get_ref()) {
                Ok(delivery) => {
                    progress.ok();
                    if matches!(delivery, Delivery::Stale | Delivery::Invalid) {
                        tracing::warn!(outcome = delivery.label(), "the learner refused the group");
                    } else {
                        tracing::debug!(outcome = delivery.label(), "group delivered");
                    }
                    return delivery;
                }
                Err(problem) => Status::internal(problem),
            },
            Err(status) => status,
        };
        progress.failed();
        if is_permanent(&failure) {
            tracing::error!(code = ?failure.code(), message = failure.message(), "the learner refused the call; not retrying");
            return Delivery::Undelivered;
        }
        metrics.submit_retries.inc();
        let delay = backoff.next_delay();
        tracing::warn!(code = ?failure.code(), message = failure.message(), retry_in = ?delay, "submitting the group failed");
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_for_one_group_are_classified() {
        let r = |a, d, s, i| SubmitGroupsResponse { accepted: a, duplicate: d, stale: s, invalid: i, rejected_group_ids: vec![] };
        assert_eq!(classify(&r(1, 0, 0, 0)), Ok(Delivery::Accepted));
        assert_eq!(classify(&r(0, 1, 0, 0)), Ok(Delivery::Duplicate));
        assert_eq!(classify(&r(0, 0, 1, 0)), Ok(Delivery::Stale));
        assert_eq!(classify(&r(0, 0, 0, 1)), Ok(Delivery::Invalid));
        assert!(classify(&r(0, 0, 0, 0)).is_err());
        assert!(classify(&r(1, 1, 0, 0)).is_err());
        assert!(classify(&r(u32::MAX, u32::MAX, 2, 0)).is_err());
        assert!(Delivery::Duplicate.reached_learner() && !Delivery::Stale.reached_learner());
    }
}
