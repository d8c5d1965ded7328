//! Group-relative advantages (GRPO and Dr. GRPO).

use serde::{Deserialize, Serialize};

/// How rewards of one group become advantages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdvantageKind {
    /// `(r - mean) / (std + eps)` with the unbiased (n - 1) std, as the released trainer does.
    #[default]
    Grpo,
    /// `r - mean` without the std division (Dr. GRPO).
    DrGrpo,
}

/// Advantage settings of a run (`algorithm.advantage` in the YAML config).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdvantageConfig {
    /// Normalisation.
    pub kind: AdvantageKind,
    /// Added to the std before dividing (`1e-4` in the released trainer).
    pub std_eps: f64,
    /// Drop groups whose rewards are all equal (they carry no learning signal).
    pub drop_uniform_groups: bool,
}

impl Default for AdvantageConfig {
    fn default() -> Self {
        Self {
            kind: AdvantageKind::Grpo,
            std_eps: 1e-4,
            drop_uniform_groups: false,
        }
    }
}

/// Why advantages could not be computed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AdvantageError {
    /// A reward is NaN or infinite.
    #[error("reward {index} of group {group} is not finite: {value}")]
    NonFiniteReward {
        /// Index of the group.
        group: usize,
        /// Index of the completion within its group.
        index: usize,
        /// The rejected reward.
        value: f64,
    },
    /// `std_eps` is negative, NaN or infinite.
    #[error("std_eps must be finite and >= 0, got {0}")]
    BadEpsilon(f64),
}

/// Advantages of the groups that were kept.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GroupAdvantages {
    /// Indices of the kept groups, ascending.
    pub kept: Vec<usize>,
    /// Advantages of each kept group, in the order of `kept`.
    pub advantages: Vec<Vec<f64>>,
}

/// Whether all rewards of a group are equal (true for an empty group or a group of one).
pub fn is_uniform(rewards: &[f64]) -> bool {
    rewards.windows(2).all(|pair| pair[0] == pair[1])
}

/// Advantages of one group.
///
/// A uniform group gets exactly 0.0 everywhere: the released trainer also gives 0 there, up to
/// rounding (its mean of eight equal floats can differ from them in the last bit). A group of
/// one is uniform, so it gets 0.0 where torch's unbiased std of one element would make it NaN.
/// Computed in f64; the released trainer uses f32.
pub fn group_advantages(rewards: &[f64], kind: AdvantageKind, std_eps: f64) -> Vec<f64> {
    if is_uniform(rewards) {
        return vec![0.0; rewards.len()];
    }
    // Group sizes are small integers; the conversion is exact.
    let n = rewards.len() as f64;
    let mean = rewards.iter().sum::<f64>() / n;
    match kind {
        AdvantageKind::DrGrpo => rewards.iter().map(|r| r - mean).collect(),
        AdvantageKind::Grpo => {
            let var = rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1.0);
            let scale = var.sqrt() + std_eps;
            rewards.iter().map(|r| (r - mean) / scale).collect()
        }
    }
}

/// Advantages of a batch of groups, dropping uniform groups when the config says so.
pub fn compute_advantages<G: AsRef<[f64]>>(
    groups: &[G],
    config: &AdvantageConfig,
) -> Result<GroupAdvantages, AdvantageError> {
    if !(config.std_eps.is_finite() && config.std_eps >= 0.0) {
        return Err(AdvantageError::BadEpsilon(config.std_eps));
    }
    let mut out = GroupAdvantages::default();
    for (group, rewards) in groups.iter().enumerate() {
        let rewards = rewards.as_ref();
        if let Some((index, &value)) = rewards.iter().enumerate().find(|(_, r)| !r.is_finite()) {
            return Err(AdvantageError::NonFiniteReward {
                group,
                index,
                value,
            });
        }
        if config.drop_uniform_groups && is_uniform(rewards) {
            continue;
        }
        out.kept.push(group);
        out.advantages
            .push(group_advantages(rewards, config.kind, config.std_eps));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_close(actual: &[f64], expected: &[f64]) {
        assert_eq!(actual.len(), expected.len());
        for (a, e) in actual.iter().zip(expected) {
            assert!((a - e).abs() < 1e-12, "{actual:?} != {expected:?}");
        }
    }

    #[test]
    fn grpo_one_correct_of_four() {
        // mean 0.25; squared deviations 0.5625 + 3 * 0.0625 = 0.75; unbiased var 0.25; std 0.5.
        let a = group_advantages(&[1.0, 0.0, 0.0, 0.0], AdvantageKind::Grpo, 1e-4);
        assert_close(
            &a,
            &[
                0.75 / 0.5001,
                -0.25 / 0.5001,
                -0.25 / 0.5001,
                -0.25 / 0.5001,
            ],
        );
        assert_close(
            &a,
            &[
                1.4997000599880024,
                -0.4999000199960008,
                -0.4999000199960008,
                -0.4999000199960008,
            ],
        );
    }

    #[test]
    fn grpo_care_scale_rewards() {
        // Totals of the released run: acc + format + 0.5 * acc bonus, in 0..=2.5.
        // mean 1.375; deviations 1.125, 0.625, -0.375, -1.375; squares sum 3.6875; var 3.6875/3.
        let a = group_advantages(&[2.5, 2.0, 1.0, 0.0], AdvantageKind::Grpo, 1e-4);
        let s = (3.6875_f64 / 3.0).sqrt() + 1e-4;
        assert_close(&a, &[1.125 / s, 0.625 / s, -0.375 / s, -1.375 / s]);
    }

    #[test]
    fn two_element_group() {
        // mean 0.5; var (0.25 + 0.25) / 1 = 0.5.
        let a = group_advantages(&[0.0, 1.0], AdvantageKind::Grpo, 0.0);
        assert_close(&a, &[-0.5 / 0.5_f64.sqrt(), 0.5 / 0.5_f64.sqrt()]);
    }

    #[test]
    fn dr_grpo_skips_the_std() {
        let a = group_advantages(&[1.0, 0.0, 0.0, 0.0], AdvantageKind::DrGrpo, 1e-4);
        assert_eq!(a, vec![0.75, -0.25, -0.25, -0.25]);
    }

    #[test]
    fn uniform_groups_are_exactly_zero() {
        for kind in [AdvantageKind::Grpo, AdvantageKind::DrGrpo] {
            assert_eq!(group_advantages(&[0.1; 8], kind, 1e-4), vec![0.0; 8]);
            assert_eq!(group_advantages(&[2.5; 8], kind, 1e-4), vec![0.0; 8]);
            assert_eq!(group_advantages(&[1.0], kind, 1e-4), vec![0.0]);
            assert_eq!(group_advantages(&[], kind, 1e-4), Vec::<f64>::new());
        }
    }

    #[test]
    fn dropping_uniform_groups_reports_the_kept_ones() -> Result<(), AdvantageError> {
        let groups = vec![
            vec![1.0, 1.0],
            vec![1.0, 0.0],
            vec![0.5],
            vec![],
            vec![0.0, 2.0, 0.0],
        ];
        let config = AdvantageConfig {
            kind: AdvantageKind::DrGrpo,
            drop_uniform_groups: true,
            ..Default::default()
        };
        let out = compute_advantages(&groups, &config)?;
        assert_eq!(out.kept, vec![1, 4]);
        assert_eq!(out.advantages.len(), 2);
        assert_close(&out.advantages[0], &[0.5, -0.5]);
        assert_close(&out.advantages[1], &[-2.0 / 3.0, 4.0 / 3.0, -2.0 / 3.0]);

        let keep_all = AdvantageConfig {
            drop_uniform_groups: false,
            ..config
        };
        let out = compute_advantages(&groups, &keep_all)?;
        assert_eq!(out.kept, vec![0, 1, 2, 3, 4]);
        assert_eq!(out.advantages[0], vec![0.0, 0.0]);
        assert_eq!(out.advantages[2], vec![0.0]);
        assert!(out.advantages[3].is_empty());
        Ok(())
    }

    #[test]
    fn rejects_non_finite_rewards_and_bad_eps() {
        let groups = [vec![0.0, 1.0], vec![0.0, f64::NAN]];
        let err = compute_advantages(&groups, &AdvantageConfig::default());
        assert!(
            matches!(err, Err(AdvantageError::NonFiniteReward { group: 1, index: 1, value }) if value.is_nan())
        );
        let bad = AdvantageConfig {
            std_eps: -1.0,
            ..Default::default()
        };
        assert_eq!(
            compute_advantages(&[[0.0]], &bad),
            Err(AdvantageError::BadEpsilon(-1.0))
        );
    }

    #[test]
    fn config_serde() -> Result<(), serde_json::Error> {
        let c: AdvantageConfig =
            serde_json::from_str(r#"{"kind": "dr_grpo", "drop_uniform_groups": true}"#)?;
        assert_eq!(
            c,
            AdvantageConfig {
                kind: AdvantageKind::DrGrpo,
                std_eps: 1e-4,
                drop_uniform_groups: true
            }
        );
        assert_eq!(serde_json::to_string(&AdvantageKind::Grpo)?, "\"grpo\"");
        assert!(serde_json::from_str::<AdvantageConfig>(r#"{"kind": "ppo"}"#).is_err());
        assert!(serde_json::from_str::<AdvantageConfig>(r#"{"eps": 0.1}"#).is_err());
        Ok(())
    }
}
