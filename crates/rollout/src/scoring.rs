//! Rule rewards of a group's completions and what the coordinator learns from them.

use std::collections::HashMap;

use medrl_proto::v1::Reward;
use medrl_vqa::reward::RewardComponents;
use medrl_vqa::{RewardConfig, VqaRecord};

/// Scores one completion's text: the weighted total and every named component.
pub fn score(rewards: &RewardConfig, text: &str, record: &VqaRecord) -> (Reward, f64) {
    let outcome = rewards.score(text, &record.gold());
    let RewardComponents { format, accuracy, med_vl_thinker, eval_kit } = outcome.components;
    let components: HashMap<String, f32> = [("format", format), ("accuracy", accuracy), ("med_vl_thinker", med_vl_thinker), ("eval_kit", eval_kit)]
        .into_iter()
        .map(|(name, value)| (name.to_string(), value as f32))
        .collect();
    (Reward { total: outcome.total as f32, components }, accuracy)
}

/// Fraction of the group whose accuracy component is positive (what the coordinator's support
/// map expects); `None` for an empty group.
pub fn pass_rate(accuracies: &[f64]) -> Option<f32> {
    if accuracies.is_empty() {
        return None;
    }
    let correct = accuracies.iter().filter(|&&a| a > 0.0).count();
    Some(correct as f32 / accuracies.len() as f32)
}

/// Why sampling stopped: `eos` for an end-of-sequence token of the model, `stop` for another
/// stop token (e.g. `<|im_end|>` when it is not the model's eos), `length` for the budget.
pub fn finish_reason(stopped: bool, last_token: Option<u32>, eos_ids: &[u32]) -> &'static str {
    match (stopped, last_token) {
        (true, Some(t)) if eos_ids.contains(&t) => "eos",
        (true, _) => "stop",
        (false, _) => "length",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> VqaRecord {
        VqaRecord {
            id: "r/1".into(),
            dataset: "synthetic".into(),
            modality: "shape".into(),
            images: vec![],
            question: "Which?".into(),
            options: vec!["circle".into(), "square".into()],
            answer_label: Some("B".into()),
            answer: "square".into(),
        }
    }

    #[test]
    fn rewards_carry_every_component() {
        let (reward, acc) = score(&RewardConfig::default(), "<think>x</think><answer>B</answer>", &record());
        assert_eq!(reward.total, 2.0);
        assert_eq!(reward.components.get("accuracy"), Some(&1.0));
        assert_eq!(reward.components.get("format"), Some(&1.0));
        assert_eq!(reward.components.len(), 4);
        assert_eq!(acc, 1.0);
        let (reward, acc) = score(&RewardConfig::default(), "no idea", &record());
        assert_eq!((reward.total, acc), (0.0, 0.0));
    }

    #[test]
    fn pass_rate_and_finish_reasons() {
        assert_eq!(pass_rate(&[1.0, 0.0, 0.0, 1.0]), Some(0.5));
        assert_eq!(pass_rate(&[]), None);
        assert_eq!(finish_reason(true, Some(5), &[5]), "eos");
        assert_eq!(finish_reason(true, Some(6), &[5]), "stop");
        assert_eq!(finish_reason(false, Some(6), &[5]), "length");
    }
}
