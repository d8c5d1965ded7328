//! The support-gap report: per dataset and modality, Pass@K minus greedy Acc@1 and the
//! boundary-aware recommendation of paper-recipe.md §9 (bridge low support with SFT first; let
//! RL sharpen where support exists but greedy decoding lags).

use std::fmt::Write as _;
use std::path::Path;

use medrl_vqa::pass_at_k;
use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};
use crate::metrics::{GroupMetrics, Metrics, escape_cell, group_by, percent, write_file};
use crate::samples::ItemSamples;

/// Where the boundary-aware rule draws its lines.
///
/// paper-recipe.md §9 (the project page's recipe) and §2 item 4 state the rule only in words:
/// "if support is low, bridge … to raise Pass@K; once support is sufficient, apply GRPO-style
/// RL". No number is published, so the defaults are this project's choice (see the fields).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SupportThresholds {
    /// Pass@K below this is low support. Default 0.5: below it, most items have no correct
    /// answer among K samples, and every GRPO group drawn on them has zero advantage.
    pub low_support: f64,
    /// Pass@K minus Acc@1 at or above this is a gap RL can close. Default 0.10 (ten points).
    pub min_gap: f64,
    /// Group size G of the "mixed groups" column; default 8, the released run's
    /// `num_return_sequences` (paper-recipe.md §4.2).
    pub group_size: u64,
}

impl Default for SupportThresholds {
    fn default() -> Self {
        SupportThresholds { low_support: 0.5, min_gap: 0.10, group_size: 8 }
    }
}

impl SupportThresholds {
    /// Checks that the thresholds are fractions and the group size is positive.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [("low_support", self.low_support), ("min_gap", self.min_gap)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(EvalError::config(name, format!("expected a fraction in [0, 1], got {v}")));
            }
        }
        if self.group_size == 0 {
            return Err(EvalError::config("group_size", "expected at least 1"));
        }
        Ok(())
    }
}

/// Which side of the boundary a group is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Regime {
    /// Pass@K below the support threshold.
    LowSupport,
    /// Support present and Pass@K well above Acc@1.
    RlSharpens,
    /// Support present, greedy already close to Pass@K.
    SmallGap,
    /// No samples, so no Pass@K.
    Unknown,
}

impl Regime {
    /// The recommendation in words.
    pub fn advice(self) -> &'static str {
        match self {
            Regime::LowSupport => "low support: bridge first (SFT or task/modality-proximal data) to raise Pass@K; RL has little to sharpen",
            Regime::RlSharpens => "support present, greedy lags: RL (GRPO-style) should sharpen the distribution and raise Acc@1",
            Regime::SmallGap => "support present, small gap: little left for RL to sharpen; harder or new data would be needed",
            Regime::Unknown => "no samples: Pass@K unknown",
        }
    }
}

/// One row of the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SupportRow {
    /// `overall`, `dataset` or `modality`.
    pub scope: String,
    /// Group name.
    pub name: String,
    /// Number of items.
    pub items: usize,
    /// Greedy accuracy.
    pub acc_at_1: f64,
    /// The K of Pass@K (the largest k reported); 0 without samples.
    pub k: u64,
    /// Pass@K.
    pub pass_at_k: Option<f64>,
    /// Pass@K minus Acc@1.
    pub gap: Option<f64>,
    /// Expected fraction of items whose GRPO group of `group_size` completions mixes right and
    /// wrong answers, the only groups with a non-zero advantage (needs n >= group size).
    pub mixed_groups: Option<f64>,
    /// Where the group stands.
    pub regime: Regime,
}

/// Probability that `g` of `n` samples, `c` of them correct, drawn without replacement, hold
/// both a correct and a wrong one: 1 - P(all wrong) - P(all right), both from Pass@g.
pub fn mixed_group_probability(n: u64, c: u64, g: u64) -> Result<f64> {
    Ok(pass_at_k(n, c, g)? + pass_at_k(n, n.saturating_sub(c), g)? - 1.0)
}

fn row(scope: &str, name: &str, m: &GroupMetrics, members: &[&ItemSamples], t: &SupportThresholds) -> Result<SupportRow> {
    let support = m.support();
    let gap = support.map(|(_, p)| p - m.acc_at_1);
    let regime = match support {
        None => Regime::Unknown,
        Some((_, p)) if p < t.low_support => Regime::LowSupport,
        Some((_, p)) if p - m.acc_at_1 >= t.min_gap => Regime::RlSharpens,
        Some(_) => Regime::SmallGap,
    };
    let mixed = if m.samples_per_item >= t.group_size && !members.is_empty() {
        let mut sum = 0.0;
        for item in members {
            sum += mixed_group_probability(item.samples.len() as u64, item.correct_samples(), t.group_size)?;
        }
        Some(sum / members.len() as f64)
    } else {
        None
    };
    Ok(SupportRow {
        scope: scope.into(),
        name: name.into(),
        items: m.items,
        acc_at_1: m.acc_at_1,
        k: support.map_or(0, |(k, _)| k),
        pass_at_k: support.map(|(_, p)| p),
        gap,
        mixed_groups: mixed,
        regime,
    })
}

/// The report's rows: overall, then each dataset, then each modality.
pub fn support_rows(metrics: &Metrics, items: &[ItemSamples], t: &SupportThresholds) -> Result<Vec<SupportRow>> {
    t.validate()?;
    let all: Vec<&ItemSamples> = items.iter().collect();
    let mut rows = vec![row("overall", "all", &metrics.overall, &all, t)?];
    for (scope, groups, key) in [
        ("dataset", &metrics.by_dataset, (|i: &ItemSamples| i.dataset.as_str()) as fn(&ItemSamples) -> &str),
        ("modality", &metrics.by_modality, |i: &ItemSamples| i.modality.as_str()),
    ] {
        let members = group_by(items, key);
        for (name, m) in groups {
            rows.push(row(scope, name, m, members.get(name.as_str()).map_or(&[][..], Vec::as_slice), t)?);
        }
    }
    Ok(rows)
}

/// The report as markdown: the table, then the rule, its thresholds and where they come from.
pub fn support_gap_markdown(rows: &[SupportRow], t: &SupportThresholds) -> String {
    let mut md = String::from("# Support gap: Pass@K vs greedy Acc@1\n\n");
    let _ = writeln!(
        md,
        "| scope | group | items | Acc@1 | Pass@K | K | gap | mixed groups (G={}) | recommendation |\n|---|---|---:|---:|---:|---:|---:|---:|---|",
        t.group_size
    );
    let opt = |v: Option<f64>| v.map_or_else(|| "–".to_owned(), percent);
    for r in rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.scope,
            escape_cell(&r.name),
            r.items,
            percent(r.acc_at_1),
            opt(r.pass_at_k),
            r.k,
            opt(r.gap),
            opt(r.mixed_groups),
            r.regime.advice()
        );
    }
    let _ = write!(
        md,
        "\nValues in %. gap = Pass@K − Acc@1 (percentage points). Pass@K is the unbiased estimator at the largest k \
         reported; Acc@1 is greedy. mixed groups = expected share of items whose GRPO group of G completions holds \
         both a right and a wrong answer: only those give a non-zero advantage.\n\n\
         ## Rule\n\n\
         - Pass@K < {low}%: **low support** → bridge with SFT (or task/modality-proximal data) first to raise Pass@K.\n\
         - Pass@K ≥ {low}% and gap ≥ {gap} points: **RL sharpens** → GRPO-style RL should turn support into Acc@1.\n\
         - Pass@K ≥ {low}% and gap < {gap} points: **small gap** → greedy already finds most of what sampling finds.\n\n\
         Where the rule comes from: paper-recipe.md §9 (the project page's boundary-aware recipe: \"if support is low, \
         bridge the distribution with targeted medical data (SFT or task/modality-proximal training) to raise Pass@K; \
         then, once support is sufficient, apply GRPO-style RL to sharpen the distribution and improve Acc@1\") and §2 \
         item 4 (RL helps most when Pass@K is already non-trivial). Neither gives numbers: the thresholds {low}% and \
         {gap} points are this project's defaults (below {low}% most items have no correct answer among K samples, so \
         GRPO groups on them carry no signal), settable in the report config.\n\n\
         Caveat for multiple choice: uniform guessing among m options already gives Pass@K = 1 − (1 − 1/m)^K \
         (4 options: Pass@16 = 99.0%, Acc@1 = 25%), so read MCQ support against chance.\n",
        low = percent(t.low_support),
        gap = percent(t.min_gap),
    );
    md
}

/// Writes `support_gap.md` and `support_gap.json` into `dir` and returns the rows.
pub fn write_support_gap(dir: &Path, metrics: &Metrics, items: &[ItemSamples], t: &SupportThresholds) -> Result<Vec<SupportRow>> {
    let rows = support_rows(metrics, items, t)?;
    write_file(&dir.join("support_gap.md"), &support_gap_markdown(&rows, t))?;
    let json = serde_json::to_string_pretty(&serde_json::json!({"thresholds": t, "rows": rows}))
        .map_err(|e| EvalError::Data(e.to_string()))?;
    write_file(&dir.join("support_gap.json"), &(json + "\n"))?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::compute_metrics;
    use crate::samples::Judged;

    fn item(id: &str, dataset: &str, greedy: bool, correct: usize, n: usize) -> ItemSamples {
        let j = |c: bool| Judged { text: String::new(), prediction: if c { "A".into() } else { "B".into() }, correct: c, format_ok: true };
        ItemSamples {
            id: id.into(),
            dataset: dataset.into(),
            modality: "x".into(),
            answer_label: Some("A".into()),
            answer: "a".into(),
            greedy: j(greedy),
            samples: (0..n).map(|i| j(i < correct)).collect(),
        }
    }

    #[test]
    fn mixed_groups_by_brute_force() -> Result<()> {
        // n = 4, c = 2, G = 2: of the 6 pairs, 4 mix one right and one wrong.
        assert!((mixed_group_probability(4, 2, 2)? - 4.0 / 6.0).abs() < 1e-15);
        assert_eq!(mixed_group_probability(4, 0, 2)?, 0.0);
        assert_eq!(mixed_group_probability(4, 4, 2)?, 0.0);
        Ok(())
    }

    #[test]
    fn regimes_follow_the_thresholds() -> Result<()> {
        let items = vec![
            // low: no sample right.
            item("1", "low", false, 0, 8),
            item("2", "low", false, 0, 8),
            // sharpen: every item has support, greedy wrong on one of two.
            item("3", "sharp", false, 3, 8),
            item("4", "sharp", true, 5, 8),
            // small gap: greedy right and support full.
            item("5", "flat", true, 8, 8),
        ];
        let m = compute_metrics(&items)?;
        let rows = support_rows(&m, &items, &SupportThresholds::default())?;
        let regime = |name: &str| rows.iter().find(|r| r.scope == "dataset" && r.name == name).map(|r| r.regime);
        assert_eq!(regime("low"), Some(Regime::LowSupport));
        assert_eq!(regime("sharp"), Some(Regime::RlSharpens));
        assert_eq!(regime("flat"), Some(Regime::SmallGap));
        let sharp = rows.iter().find(|r| r.name == "sharp").map(|r| (r.gap, r.k));
        assert_eq!(sharp, Some((Some(0.5), 8)));
        let md = support_gap_markdown(&rows, &SupportThresholds::default());
        assert!(md.contains("paper-recipe.md §9") && md.contains("50.00%"), "{md}");
        Ok(())
    }

    #[test]
    fn thresholds_reject_nonsense() {
        let t = SupportThresholds { low_support: 1.5, ..SupportThresholds::default() };
        assert!(t.validate().is_err());
        assert!(serde_json::from_str::<SupportThresholds>(r#"{"low": 0.3}"#).is_err());
    }
}
