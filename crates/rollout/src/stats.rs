//! The tally a worker returns when it exits.

use crate::lease::LeaseReport;

/// What one worker did over its life.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerStats {
    /// Times the worker registered (more than one after the coordinator forgot it).
    pub registrations: u64,
    /// Non-empty leases received.
    pub leases: u64,
    /// Prompts received in leases.
    pub prompts: u64,
    /// Groups sampled.
    pub groups_sampled: u64,
    /// Prompts that could not be sampled (bad record or image, too long, model error).
    pub prompts_failed: u64,
    /// Completion tokens sampled.
    pub completion_tokens: u64,
    /// Groups the learner accepted.
    pub groups_accepted: u64,
    /// Groups the learner already had.
    pub groups_duplicate: u64,
    /// Groups the learner refused as stale.
    pub groups_stale: u64,
    /// Groups the learner refused as malformed.
    pub groups_invalid: u64,
    /// Groups given up on without an answer.
    pub groups_undelivered: u64,
    /// Successful AckLease calls (one per lease at most).
    pub acks: u64,
    /// Prompts newly marked delivered by those acks.
    pub prompts_delivered: u64,
    /// Prompts the coordinator already had as delivered (a retried or late ack).
    pub ack_duplicates: u64,
    /// Weight versions installed.
    pub weight_updates: u64,
    /// Weight fetch tries that failed (each left the old weights in place).
    pub weight_failures: u64,
    /// The version held at exit.
    pub policy_version: u64,
    /// True when the worker exited because the coordinator said the run is done.
    pub run_done: bool,
}

impl WorkerStats {
    /// Adds what became of one lease.
    pub fn add_lease(&mut self, r: &LeaseReport) {
        self.groups_accepted += r.accepted;
        self.groups_duplicate += r.duplicate;
        self.groups_stale += r.stale;
        self.groups_invalid += r.invalid;
        self.groups_undelivered += r.undelivered;
        self.acks += u64::from(r.acked);
        self.prompts_delivered += r.newly_delivered;
        self.ack_duplicates += r.ack_duplicates;
    }
}
