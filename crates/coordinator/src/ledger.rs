//! Per-epoch accounting of every prompt: pending -> leased -> delivered -> trained (or skipped,
//! failed). The queue is the epoch order: pending prompts are served by their position in it, a
//! prompt that came back after the cursor passed it included, so the queue follows from the
//! statuses alone, which is what lets a restart resume the same order.

use std::collections::BTreeSet;

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
    /// Position of each prompt in `order`.
    position: Vec<u32>,
    status: Vec<Status>,
    /// Next position of `order` not yet considered.
    cursor: usize,
    /// Positions, before the cursor, of prompts that became pending again; served first,
    /// earliest position first, so a requeue keeps the data order whatever order it came in.
    returned: BTreeSet<u32>,
    counts: Counts,
    /// Grants of each prompt in this epoch by this process (not durable).
    attempts: Vec<u32>,
}

impl EpochLedger {
    /// Opens an epoch of `n` prompts in its seeded order, all pending.
    pub fn open(epoch: u32, n: u32, seed: u64) -> EpochLedger {
        let order = epoch_order(n, seed, epoch);
        let mut position = vec![0; order.len()];
        for (i, &p) in order.iter().enumerate() {
            position[p as usize] = i as u32;
        }
        EpochLedger {
            epoch,
            order,
            position,
            status: vec![Status::Pending; n as usize],
            cursor: 0,
            returned: BTreeSet::new(),
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
    /// again is queued in front of the prompts not yet reached, at its place in the order.
    pub fn set(&mut self, prompt: u32, new: Status) {
        let Some(old) = self.status.get(prompt as usize).copied() else { return };
        if old == new {
            return;
        }
        *self.counts.slot_mut(old.slot()) -= 1;
        *self.counts.slot_mut(new.slot()) += 1;
        self.status[prompt as usize] = new;
        let at = self.position[prompt as usize];
        // One the cursor has yet to reach is served in its turn anyway.
        if new == Status::Pending && (at as usize) < self.cursor {
            self.returned.insert(at);
        }
    }

    /// The next pending prompt in queue order, or `None`. It stays pending until `set`.
    pub fn next_pending(&mut self) -> Option<u32> {
        while let Some(at) = self.returned.pop_first() {
            let p = self.order[at as usize];
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

    #[test]
    fn requeued_prompts_come_back_in_data_order_whatever_order_they_are_requeued_in() {
        // A learner restart: the step it lost (positions 0, 1, trained) and the next step's
        // deliveries (positions 2, 3) go back, the deliveries named first, as sync_learner does.
        let mut e = EpochLedger::open(0, 8, 42);
        let order = e.order().to_vec();
        for (i, &p) in order[..4].iter().enumerate() {
            assert_eq!(e.next_pending(), Some(p));
            e.set(p, Status::Leased(i as u64));
        }
        for &p in &order[..2] {
            e.set(p, Status::Trained(3));
        }
        for &p in &order[2..4] {
            e.set(p, Status::Delivered);
        }
        for &p in [order[3], order[2], order[1], order[0]].iter() {
            e.set(p, Status::Pending);
        }
        let served: Vec<u32> = std::iter::from_fn(|| {
            let p = e.next_pending()?;
            e.set(p, Status::Leased(9));
            Some(p)
        })
        .collect();
        assert_eq!(served, order, "the whole epoch in its data order");
    }

    #[test]
    fn a_prompt_requeued_before_the_cursor_reaches_it_is_served_once_in_its_turn() {
        let mut e = EpochLedger::open(0, 4, 7);
        let order = e.order().to_vec();
        e.set(order[2], Status::Delivered);
        e.set(order[2], Status::Pending);
        let served: Vec<u32> = std::iter::from_fn(|| {
            let p = e.next_pending()?;
            e.set(p, Status::Leased(1));
            Some(p)
        })
        .collect();
        assert_eq!(served, order);
        assert_eq!(e.counts().leased, 4);
    }
}
