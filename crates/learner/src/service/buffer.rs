//! Accepted groups waiting for a step. A group taken for a step stays known to the buffer until the
//! step has recorded it in the consumed log (or refused it): otherwise a retry arriving while the
//! step runs would be accepted again and trained twice.

use std::collections::{HashSet, VecDeque};

use medrl_proto::v1::RolloutGroup;
use medrl_vqa::VqaRecord;

use crate::service::consumed::ConsumedGroup;

/// A group accepted for training, with its parsed record.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// The group as the worker sent it.
    pub group: RolloutGroup,
    /// Its record (gold answer, label, options).
    pub record: VqaRecord,
}

impl Accepted {
    /// The identity the consumed log records.
    pub fn key(&self) -> ConsumedGroup {
        ConsumedGroup { group_id: self.group.group_id.clone(), epoch: self.group.epoch, prompt_id: self.group.prompt_id.clone() }
    }
}

/// Pending groups in arrival order, plus the identities of those being trained.
#[derive(Debug, Default)]
pub struct GroupBuffer {
    pending: VecDeque<Accepted>,
    group_ids: HashSet<String>,
    prompts: HashSet<(u32, String)>,
    in_training: usize,
}

impl GroupBuffer {
    /// True when a group with this id, or of this prompt in this epoch, is pending or in training.
    pub fn holds(&self, group_id: &str, epoch: u32, prompt_id: &str) -> bool {
        self.group_ids.contains(group_id) || self.prompts.contains(&(epoch, prompt_id.to_string()))
    }

    /// Adds an accepted group (the caller checked [`Self::holds`]).
    pub fn push(&mut self, accepted: Accepted) {
        self.group_ids.insert(accepted.group.group_id.clone());
        self.prompts.insert((accepted.group.epoch, accepted.group.prompt_id.clone()));
        self.pending.push_back(accepted);
    }

    /// Groups waiting for a step.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// True when no group is waiting.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Groups taken by a step that has not finished.
    pub fn in_training(&self) -> usize {
        self.in_training
    }

    /// Takes the oldest `n` groups for a step, ordered by group id; they stay known until
    /// [`Self::release`]. The order makes a step train the same sequences in the same
    /// micro-batches however its groups raced in, so that a rerun sums its gradients in the same
    /// order and takes the same step to the last digit.
    pub fn take(&mut self, n: usize) -> Vec<Accepted> {
        let n = n.min(self.pending.len());
        self.in_training += n;
        let mut taken: Vec<Accepted> = self.pending.drain(..n).collect();
        taken.sort_by(|a, b| a.group.group_id.cmp(&b.group.group_id));
        taken
    }

    /// Forgets groups a step has finished with (trained and logged, or refused).
    pub fn release(&mut self, keys: &[ConsumedGroup]) {
        for key in keys {
            self.group_ids.remove(&key.group_id);
            self.prompts.remove(&(key.epoch, key.prompt_id.clone()));
        }
        self.in_training = self.in_training.saturating_sub(keys.len());
    }

    /// Removes every pending group (the run finished without them).
    pub fn drain_pending(&mut self) -> Vec<Accepted> {
        let drained: Vec<Accepted> = self.pending.drain(..).collect();
        for a in &drained {
            self.group_ids.remove(&a.group.group_id);
            self.prompts.remove(&(a.group.epoch, a.group.prompt_id.clone()));
        }
        drained
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepted(epoch: u32, prompt: &str, attempt: u64) -> Accepted {
        let group = RolloutGroup {
            group_id: medrl_proto::group_id(epoch, prompt, attempt),
            prompt_id: prompt.into(),
            epoch,
            attempt,
            ..Default::default()
        };
        let record = VqaRecord {
            id: prompt.into(),
            dataset: "d".into(),
            modality: String::new(),
            images: vec![],
            question: "q".into(),
            options: vec![],
            answer_label: None,
            answer: "a".into(),
        };
        Accepted { group, record }
    }

    #[test]
    fn taken_groups_stay_known_until_released() {
        let mut b = GroupBuffer::default();
        b.push(accepted(0, "a", 1));
        b.push(accepted(0, "b", 1));
        assert!(b.holds("x", 0, "a") && b.holds(&medrl_proto::group_id(0, "b", 1), 9, "z"));
        assert!(!b.holds("x", 1, "a"), "another epoch is another prompt");
        let taken = b.take(1);
        assert_eq!((taken.len(), b.len(), b.in_training()), (1, 1, 1));
        assert!(b.holds("x", 0, "a"), "in training still counts");
        b.release(&[taken[0].key()]);
        assert!(!b.holds("x", 0, "a"));
        assert_eq!(b.in_training(), 0);
        assert_eq!(b.drain_pending().len(), 1);
        assert!(b.is_empty() && !b.holds("x", 0, "b"));
    }

    #[test]
    fn a_step_takes_its_groups_in_id_order_whatever_their_arrival() {
        let mut b = GroupBuffer::default();
        for prompt in ["c", "a", "b", "d"] {
            b.push(accepted(0, prompt, 1));
        }
        let ids: Vec<String> = b.take(3).into_iter().map(|a| a.group.group_id).collect();
        let want: Vec<String> = ["a", "b", "c"].iter().map(|p| medrl_proto::group_id(0, p, 1)).collect();
        assert_eq!(ids, want, "the oldest three, sorted");
        assert_eq!(b.drain_pending()[0].group.prompt_id, "d");
    }
}
