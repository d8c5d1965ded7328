//! Support-aware scheduling: per-prompt pass rates from acked groups, the decision to skip
//! prompts without learning signal (all wrong or all right), and the per-modality support map.

use crate::config::SupportConfig;
use crate::journal::SkipReason;

/// What the coordinator has seen of one prompt's groups.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PromptSupport {
    /// Groups observed with a pass rate.
    pub observations: u32,
    /// Pass rate of the latest observed group.
    pub last_pass_rate: f32,
    /// Epoch of the latest observation.
    pub last_epoch: u32,
}

impl PromptSupport {
    /// Records one group's pass rate.
    pub fn observe(&mut self, epoch: u32, pass_rate: f32) {
        self.observations = self.observations.saturating_add(1);
        self.last_pass_rate = pass_rate;
        self.last_epoch = self.last_epoch.max(epoch);
    }
}

/// Support class of a prompt, the unit of the support map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SupportClass {
    /// Never observed.
    Unseen,
    /// All wrong (pass rate at or below the zero-support threshold).
    Zero,
    /// Mixed: the groups RL learns from.
    Partial,
    /// All right (pass rate at or above the saturation threshold).
    Saturated,
}

impl SupportClass {
    /// Label used in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            SupportClass::Unseen => "unseen",
            SupportClass::Zero => "zero",
            SupportClass::Partial => "partial",
            SupportClass::Saturated => "saturated",
        }
    }

    /// Every class, in display order.
    pub const ALL: [SupportClass; 4] = [SupportClass::Unseen, SupportClass::Zero, SupportClass::Partial, SupportClass::Saturated];
}

/// The class of a prompt under the thresholds.
pub fn classify(cfg: &SupportConfig, s: &PromptSupport) -> SupportClass {
    if s.observations == 0 {
        SupportClass::Unseen
    } else if s.last_pass_rate <= cfg.zero_support_max {
        SupportClass::Zero
    } else if s.last_pass_rate >= cfg.saturated_min {
        SupportClass::Saturated
    } else {
        SupportClass::Partial
    }
}

/// Whether to pass over a prompt when the queue reaches it in `epoch`.
pub fn skip_reason(cfg: &SupportConfig, s: &PromptSupport, epoch: u32) -> Option<SkipReason> {
    if !cfg.enabled || s.observations < cfg.min_observations || s.last_epoch >= epoch {
        // Only prompts seen in an earlier epoch are judged: within its first epoch every prompt
        // is tried, as the paper's run does.
        return None;
    }
    if cfg.recheck_every_epochs > 0 && epoch - s.last_epoch >= cfg.recheck_every_epochs {
        return None;
    }
    match classify(cfg, s) {
        SupportClass::Zero => Some(SkipReason::ZeroSupport),
        SupportClass::Saturated => Some(SkipReason::Saturated),
        SupportClass::Unseen | SupportClass::Partial => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_only_seen_prompts_outside_the_thresholds_and_rechecks() {
        let mut cfg = SupportConfig { enabled: true, recheck_every_epochs: 2, ..SupportConfig::default() };
        let mut s = PromptSupport::default();
        assert_eq!(skip_reason(&cfg, &s, 1), None);
        s.observe(0, 0.0);
        assert_eq!(skip_reason(&cfg, &s, 0), None, "same epoch");
        assert_eq!(skip_reason(&cfg, &s, 1), Some(SkipReason::ZeroSupport));
        assert_eq!(skip_reason(&cfg, &s, 2), None, "re-check after 2 epochs");
        s.observe(2, 1.0);
        assert_eq!(skip_reason(&cfg, &s, 3), Some(SkipReason::Saturated));
        s.observe(3, 0.5);
        assert_eq!(skip_reason(&cfg, &s, 4), None);
        cfg.enabled = false;
        s.observe(4, 1.0);
        assert_eq!(skip_reason(&cfg, &s, 5), None);
        assert_eq!(classify(&cfg, &s), SupportClass::Saturated);
    }
}
