//! Per-epoch accounting of every prompt: pending -> leased -> delivered -> trained (or skipped,
//! failed). The queue is the epoch order plus a front queue of prompts that came back; both are
//! rebuilt from the statuses alone, which is what lets a restart resume the same order.

use std::collections::VecDeque;

use crate::order::epoch_order;

/// Where one prompt stands within one epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Waiting to be leased.
    Pending,
    /// Held by the lease with this sequence number (not durable: a restart makes it pending).
    Leased(u64),
    /// Its group reached the learner; not yet trained.
    Delivered,
    /// Trained in the step that produced this policy version.
    Trained(u64),
    /// Passed over by support-aware scheduling this epoch.
    Skipped,
    /// Could not be served (unreadable image, too many attempts).
    Failed,
}

impl Status {
    fn slot(self) -> usize {
        match self {
            Status::Pending => 0,
            Status::Leased(_) => 1,
            Status::Delivered => 2,
            Status::Trained(_) => 3,
            Status::Skipped => 4,
            Status::Failed => 5,
        }
    }

    /// True once nothing more will happen to the prompt this epoch.
    pub fn is_final(self) -> bool {
        matches!(self, Status::Trained(_) | Status::Skipped | Status::Failed)
    }
}

/// Counts of one epoch's prompts by status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Waiting to be leased.
    pub pending: u32,
    /// Out with workers.
    pub leased: u32,
    /// At the learner, untrained.
    pub delivered: u32,
    /// Trained.
    pub trained: u32,
    /// Skipped by support-aware scheduling.
    pub skipped: u32,
    /// Failed.
    pub failed: u32,
}

impl Counts {
    fn slot_mut(&mut self, slot: usize) -> &mut u32 {
        match slot {
            0 => &mut self.pending,
            1 => &mut self.leased,
            2 => &mut self.delivered,
            3 => &mut self.trained,
            4 => &mut self.skipped,
            _ => &mut self.failed,
        }
    }

    /// Prompts out of the queue but not yet trained: what the staleness gate limits.
    pub fn in_flight(&self) -> u32 {
        self.leased + self.delivered
    }

    /// Prompts with a final status.
    pub fn finished(&self) -> u32 {
        self.trained + self.skipped + self.failed
    }
}

/// One epoch: its order, every prompt's status, and the queue position.
#[derive(Debug)]
pub struct EpochLedger {
    /// The epoch number.
    pub epoch: u32,
    order: Vec<u32>,
    status: Vec<Status>,
    /// Next position of `order` not yet considered.
    cursor: usize,
    /// Prompts that became pending again after the cursor passed them; served first.
    returned: VecDeque<u32>,
    counts: Counts,
    /// Grants of each prompt in this epoch by this process (not durable).
    attempts: Vec<u32>,
}

impl EpochLedger {
    /// Opens an epoch of `n` prompts in its seeded order, all pending.
    pub fn open(epoch: u32, n: u32, seed: u64) -> EpochLedger {
        EpochLedger {
            epoch,
            order: epoch_order(n, seed, epoch),
            status: vec![Status::Pending; n as usize],
            cursor: 0,
            returned: VecDeque::new(),
            counts: Counts { pending: n, ..Counts::default() },
            attempts: vec![0; n as usize],
        }
    }

    /// Number of prompts.
    pub fn len(&self) -> u32 {
        self.status.len() as u32
    }

    /// True for an epoch of an empty prompt set (never, in a run).
    pub fn is_empty(&self) -> bool {
        self.status.is_empty()
    }

    /// The counts by status.
    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// True when every prompt has a final status.
    pub fn is_complete(&self) -> bool {
        self.counts.finished() == self.len()
    }

    /// The status of a prompt.
    pub fn status(&self, prompt: u32) -> Status {
        self.status.get(prompt as usize).copied().unwrap_or(Status::Failed)
    }

    /// Sets a status, keeping the counts and the queue right. A prompt that becomes pending
    /// again is queued in front of the prompts not yet reached.
    pub fn set(&mut self, prompt: u32, new: Status) {
        let Some(old) = self.status.get(prompt as usize).copied() else { return };
        if old == new {
            return;
        }
        *self.counts.slot_mut(old.slot()) -= 1;
        *self.counts.slot_mut(new.slot()) += 1;
        self.status[prompt as usize] = new;
        if new == Status::Pending {
            self.returned.push_back(prompt);
        }
    }

    /// The next pending prompt in queue order, or `None`. It stays pending until `set`.
    pub fn next_pending(&mut self) -> Option<u32> {
        while let Some(p) = self.returned.pop_front() {
            if self.status(p) == Status::Pending {
                return Some(p);
            }
        }
        while self.cursor < self.order.len() {
            let p = self.order[self.cursor];
            self.cursor += 1;
            if self.status(p) == Status::Pending {
                return Some(p);
            }
        }
        None
    }

    /// Counts one more grant of a prompt and returns the new count.
    pub fn bump_attempt(&mut self, prompt: u32) -> u32 {
        match self.attempts.get_mut(prompt as usize) {
            Some(a) => {
                *a = a.saturating_add(1);
                *a
            }
            None => 0,
        }
    }

    /// Grants of a prompt in this epoch by this process.
    pub fn attempts_of(&self, prompt: u32) -> u32 {
        self.attempts.get(prompt as usize).copied().unwrap_or(0)
    }

    /// Prompts with a status matching `pred`, in epoch order.
    pub fn prompts_where(&self, pred: impl Fn(Status) -> bool) -> Vec<u32> {
        self.order.iter().copied().filter(|&p| pred(self.status(p))).collect()
    }

    /// The order of the epoch.
    pub fn order(&self) -> &[u32] {
        &self.order
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_follows_order_and_serves_returned_prompts_first() {
        let mut e = EpochLedger::open(0, 5, 1);
        let order = e.order().to_vec();
        let first = e.next_pending().expect("one");
        assert_eq!(first, order[0]);
        e.set(first, Status::Leased(1));
        let second = e.next_pending().expect("two");
        e.set(second, Status::Leased(2));
        e.set(first, Status::Pending);
        assert_eq!(e.next_pending(), Some(first));
        e.set(first, Status::Trained(1));
        assert_eq!(e.next_pending(), Some(order[2]));
        assert_eq!(e.counts(), Counts { pending: 3, leased: 1, delivered: 0, trained: 1, skipped: 0, failed: 0 });
    }
}
