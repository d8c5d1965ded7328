//! Rule rewards for one completion and their weighted total.
//!
//! Each reward is a port of the code that defined it: [`r1v`] (the paper's RL run),
//! [`med_vl_thinker`] (MedVLThinker's format-gated accuracy), [`eval_kit`] (the MedBridgeRL
//! evaluation parser). The GRPO-CARE consistency bonus needs reference-model log-probs and is
//! computed by the learner from [`RewardComponents::accuracy`].

pub mod eval_kit;
pub mod med_vl_thinker;
pub mod r1v;

use serde::{Deserialize, Serialize};

pub use eval_kit::{
    EvalKitJudgement, eval_kit_judge, extract_answer_tag, normalize_text, parse_freeform,
    parse_mcq_letter,
};
pub use med_vl_thinker::med_vl_thinker_accuracy;
pub use r1v::{accuracy_reward, clean_text, format_reward};

/// The reference answer of one item, as the rewards need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gold<'a> {
    /// Answer text: the correct option's text for MCQ items, the free-form answer otherwise.
    pub answer: &'a str,
    /// Letter of the correct option (`"A"`, `"B"`, ...) for MCQ items.
    pub label: Option<&'a str>,
    /// Option texts in letter order; empty for free-form items.
    pub options: &'a [String],
}

/// Which gold string the exact-match [`accuracy_reward`] compares against.
///
/// The released run compares against whatever its training records store, and whether that is
/// the letter or the option text is not published; the eval kit and our MCQ prompts ask for the
/// letter, so `label` is the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccuracyGold {
    /// The option letter; items without a label fall back to the answer text.
    #[default]
    Label,
    /// The answer text.
    Answer,
}

/// Weight of each reward in the total; the default is the released run (format + accuracy).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RewardWeights {
    /// Weight of [`format_reward`].
    pub format: f64,
    /// Weight of [`accuracy_reward`] (the released exact match).
    pub accuracy: f64,
    /// Weight of [`med_vl_thinker_accuracy`].
    pub med_vl_thinker: f64,
    /// Weight of the eval kit's correctness ([`eval_kit_judge`]).
    pub eval_kit: f64,
}

impl Default for RewardWeights {
    fn default() -> Self {
        Self {
            format: 1.0,
            accuracy: 1.0,
            med_vl_thinker: 0.0,
            eval_kit: 0.0,
        }
    }
}

/// Reward settings of a run (`algorithm.rewards` in the YAML config).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RewardConfig {
    /// Weight of each reward.
    pub weights: RewardWeights,
    /// Gold string of the exact-match accuracy.
    pub accuracy_gold: AccuracyGold,
}

/// A reward weight that cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RewardConfigError {
    /// The weight is NaN or infinite.
    #[error("reward weight `{name}` must be a finite number, got {value}")]
    NonFiniteWeight {
        /// Field name of the weight.
        name: &'static str,
        /// The rejected value.
        value: f64,
    },
}

/// Unweighted value of every reward for one completion, each 0.0 or 1.0.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct RewardComponents {
    /// [`format_reward`].
    pub format: f64,
    /// [`accuracy_reward`].
    pub accuracy: f64,
    /// [`med_vl_thinker_accuracy`].
    pub med_vl_thinker: f64,
    /// Eval kit correctness.
    pub eval_kit: f64,
}

/// The rewards of one completion: the weighted total and its parts.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct RewardOutcome {
    /// Sum of weight times component.
    pub total: f64,
    /// Unweighted components, for logging and for the CARE bonus.
    pub components: RewardComponents,
}

impl RewardConfig {
    /// Checks that every weight is finite.
    pub fn validate(&self) -> Result<(), RewardConfigError> {
        let w = &self.weights;
        for (name, value) in [
            ("format", w.format),
            ("accuracy", w.accuracy),
            ("med_vl_thinker", w.med_vl_thinker),
            ("eval_kit", w.eval_kit),
        ] {
            if !value.is_finite() {
                return Err(RewardConfigError::NonFiniteWeight { name, value });
            }
        }
        Ok(())
    }

    /// Scores one completion against its gold answer.
    ///
    /// Every component is computed, whatever its weight, so that logs show all of them.
    pub fn score(&self, completion: &str, gold: &Gold<'_>) -> RewardOutcome {
        let exact_gold = match self.accuracy_gold {
            AccuracyGold::Label => gold.label.unwrap_or(gold.answer),
            AccuracyGold::Answer => gold.answer,
        };
        let components = RewardComponents {
            format: format_reward(completion),
            accuracy: accuracy_reward(completion, exact_gold),
            med_vl_thinker: med_vl_thinker_accuracy(completion, gold.answer, gold.label),
            eval_kit: if eval_kit_judge(completion, gold).correct {
                1.0
            } else {
                0.0
            },
        };
        let w = &self.weights;
        let total = w.format * components.format
            + w.accuracy * components.accuracy
            + w.med_vl_thinker * components.med_vl_thinker
            + w.eval_kit * components.eval_kit;
        RewardOutcome { total, components }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> Vec<String> {
        ["Left lung", "Right lung", "Heart"]
            .map(String::from)
            .to_vec()
    }

    #[test]
    fn default_is_the_released_format_plus_accuracy() {
        let opts = options();
        let gold = Gold {
            answer: "Right lung",
            label: Some("B"),
            options: &opts,
        };
        let out = RewardConfig::default().score("<think>x</think><answer>B</answer>", &gold);
        assert_eq!(
            out,
            RewardOutcome {
                total: 2.0,
                components: RewardComponents {
                    format: 1.0,
                    accuracy: 1.0,
                    med_vl_thinker: 1.0,
                    eval_kit: 1.0
                },
            }
        );
    }

    #[test]
    fn weights_combine_components() {
        let opts = options();
        let gold = Gold {
            answer: "Right lung",
            label: Some("B"),
            options: &opts,
        };
        let config = RewardConfig {
            weights: RewardWeights {
                format: 0.5,
                accuracy: 1.0,
                med_vl_thinker: 2.0,
                eval_kit: 4.0,
            },
            accuracy_gold: AccuracyGold::Label,
        };
        // Letter and text: not an exact match, but MedVLThinker and the eval kit accept it;
        // the trailing newline fails the format (and so the gated MedVLThinker reward).
        let out = config.score("<think>x</think><answer>B. Right lung</answer>\n", &gold);
        assert_eq!(
            out.components,
            RewardComponents {
                format: 0.0,
                accuracy: 0.0,
                med_vl_thinker: 0.0,
                eval_kit: 1.0
            }
        );
        assert_eq!(out.total, 4.0);
        let out = config.score("<think>x</think><answer>B. Right lung</answer>", &gold);
        assert_eq!(out.total, 0.5 + 2.0 + 4.0);
    }

    #[test]
    fn accuracy_gold_selects_the_compared_string() {
        let opts = options();
        let gold = Gold {
            answer: "Right lung",
            label: Some("B"),
            options: &opts,
        };
        let text = RewardConfig {
            accuracy_gold: AccuracyGold::Answer,
            ..RewardConfig::default()
        };
        let completion = "<think>x</think><answer>right lung</answer>";
        assert_eq!(text.score(completion, &gold).components.accuracy, 1.0);
        assert_eq!(
            RewardConfig::default()
                .score(completion, &gold)
                .components
                .accuracy,
            0.0
        );
        let unlabelled = Gold {
            answer: "Right lung",
            label: None,
            options: &[],
        };
        assert_eq!(
            RewardConfig::default()
                .score(completion, &unlabelled)
                .components
                .accuracy,
            1.0
        );
    }

    #[test]
    fn empty_and_garbage_completions_score_zero() {
        let opts = options();
        let gold = Gold {
            answer: "Right lung",
            label: Some("B"),
            options: &opts,
        };
        for completion in [
            "",
            "\u{0}",
            "<answer>",
            "</answer><answer>",
            "🫁🫁",
            "<think></think><answer>",
        ] {
            let out = RewardConfig::default().score(completion, &gold);
            assert_eq!(out, RewardOutcome::default(), "{completion:?}");
        }
    }

    #[test]
    fn config_serde_uses_defaults_and_rejects_unknown_keys() -> Result<(), serde_json::Error> {
        let c: RewardConfig =
            serde_json::from_str(r#"{"weights": {"format": 0.5}, "accuracy_gold": "answer"}"#)?;
        assert_eq!(
            c,
            RewardConfig {
                weights: RewardWeights {
                    format: 0.5,
                    accuracy: 1.0,
                    med_vl_thinker: 0.0,
                    eval_kit: 0.0
                },
                accuracy_gold: AccuracyGold::Answer,
            }
        );
        assert_eq!(
            serde_json::from_str::<RewardConfig>("{}")?,
            RewardConfig::default()
        );
        assert!(serde_json::from_str::<RewardConfig>(r#"{"weights": {"fromat": 1.0}}"#).is_err());
        assert!(serde_json::from_str::<RewardConfig>(r#"{"bonus": 1.0}"#).is_err());
        Ok(())
    }

    #[test]
    fn validate_rejects_non_finite_weights() {
        assert_eq!(RewardConfig::default().validate(), Ok(()));
        let mut c = RewardConfig::default();
        c.weights.eval_kit = f64::INFINITY;
        assert_eq!(
            c.validate(),
            Err(RewardConfigError::NonFiniteWeight {
                name: "eval_kit",
                value: f64::INFINITY
            })
        );
    }
}
