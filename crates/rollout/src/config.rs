//! The `rollout:` section of a run config: how many completions to sample per prompt and how.
//! Defaults are the paper's run (8 samples at temperature 1.0, no top-p / top-k truncation,
//! 2048 new tokens, one prompt per lease).

use medrl_model::generate::{GenerationParams, Sampling};
use serde::{Deserialize, Serialize};

/// Sampling settings of the rollout workers. Every field has a default; unknown keys are errors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutConfig {
    /// Completions per prompt, the group size K of GRPO (default 8).
    pub group_size: u32,
    /// Softmax temperature (default 1.0); 0 means greedy decoding.
    pub temperature: f64,
    /// Nucleus mass kept (default 1.0 = off).
    pub top_p: f64,
    /// Most likely tokens kept (default 0 = off).
    pub top_k: usize,
    /// Token budget of one completion (default 2048).
    pub max_new_tokens: usize,
    /// Prompts asked for in one lease (default 1; the coordinator may cap it further).
    pub prompts_per_lease: u32,
    /// Base seed; each group's stream is derived from (seed, epoch, prompt id, attempt) (default 0).
    pub seed: u64,
    /// Longest prompt accepted, in tokens including expanded image tokens (default 16384);
    /// longer prompts are reported undelivered instead of exhausting memory.
    pub max_prompt_tokens: usize,
}

impl Default for RolloutConfig {
    fn default() -> Self {
        RolloutConfig {
            group_size: 8,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            max_new_tokens: 2048,
            prompts_per_lease: 1,
            seed: 0,
            max_prompt_tokens: 16384,
        }
    }
}

/// A rollout setting is out of range; names the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("rollout config: field `{field}`: {problem}")]
pub struct RolloutConfigError {
    /// Field name within the `rollout` section.
    pub field: &'static str,
    /// What was wrong and what was expected.
    pub problem: String,
}

fn err(field: &'static str, problem: impl Into<String>) -> RolloutConfigError {
    RolloutConfigError { field, problem: problem.into() }
}

impl RolloutConfig {
    /// Checks every field's range.
    pub fn validate(&self) -> Result<(), RolloutConfigError> {
        if self.group_size == 0 {
            return Err(err("group_size", "expected at least 1, found 0"));
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(err("temperature", format!("expected a finite number >= 0, found {}", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(err("top_p", format!("expected a number in (0, 1], found {}", self.top_p)));
        }
        if self.max_new_tokens == 0 {
            return Err(err("max_new_tokens", "expected at least 1, found 0"));
        }
        if self.prompts_per_lease == 0 {
            return Err(err("prompts_per_lease", "expected at least 1, found 0"));
        }
        if self.max_prompt_tokens == 0 {
            return Err(err("max_prompt_tokens", "expected at least 1, found 0"));
        }
        Ok(())
    }

    /// The token chooser these settings describe.
    pub fn sampling(&self) -> Sampling {
        // Temperature 0 has no softmax; it is the limit the user means: always the top token.
        if self.temperature == 0.0 {
            Sampling::Greedy
        } else {
            Sampling::Random { temperature: self.temperature, top_p: self.top_p, top_k: self.top_k }
        }
    }

    /// Generation parameters for one group, whose sample streams derive from `group_seed`.
    pub fn generation_params(&self, group_seed: u64) -> GenerationParams {
        GenerationParams { sampling: self.sampling(), max_new_tokens: self.max_new_tokens, seed: group_seed }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_papers_run() {
        let c = RolloutConfig::default();
        c.validate().expect("defaults are valid");
        assert_eq!(
            (c.group_size, c.temperature, c.top_p, c.top_k, c.max_new_tokens, c.prompts_per_lease, c.seed, c.max_prompt_tokens),
            (8, 1.0, 1.0, 0, 2048, 1, 0, 16384)
        );
        assert_eq!(c.sampling(), Sampling::Random { temperature: 1.0, top_p: 1.0, top_k: 0 });
    }

    #[test]
    fn unknown_keys_and_bad_ranges_name_the_field() {
        let parsed: RolloutConfig = serde_json::from_str(r#"{"group_size": 4, "top_k": 50}"#).expect("parses");
        assert_eq!((parsed.group_size, parsed.top_k, parsed.max_new_tokens), (4, 50, 2048));
        let e = serde_json::from_str::<RolloutConfig>(r#"{"group_sise": 4}"#).expect_err("typo");
        assert!(e.to_string().contains("group_sise"), "{e}");
        let e = serde_json::from_str::<RolloutConfig>(r#"{"temperature": "hot"}"#).expect_err("type");
        assert!(e.to_string().contains("invalid type"), "{e}");
        for (bad, field) in [
            (RolloutConfig { group_size: 0, ..Default::default() }, "group_size"),
            (RolloutConfig { temperature: f64::NAN, ..Default::default() }, "temperature"),
            (RolloutConfig { top_p: 0.0, ..Default::default() }, "top_p"),
            (RolloutConfig { max_new_tokens: 0, ..Default::default() }, "max_new_tokens"),
            (RolloutConfig { prompts_per_lease: 0, ..Default::default() }, "prompts_per_lease"),
            (RolloutConfig { max_prompt_tokens: 0, ..Default::default() }, "max_prompt_tokens"),
        ] {
            assert_eq!(bad.validate().expect_err("out of range").field, field);
        }
        assert_eq!(RolloutConfig { temperature: 0.0, ..Default::default() }.sampling(), Sampling::Greedy);
    }
}
