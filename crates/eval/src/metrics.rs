//! Metrics computed from a samples file alone: greedy Acc@1, unbiased Pass@k, the eval kit's
//! format-failure rate and mean unique answers, overall and per dataset and modality.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Write as _;
use std::path::Path;

use medrl_vqa::{SampleCounts, mean_pass_at_k};
use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};
use crate::samples::ItemSamples;

/// The k values of the paper's Pass@k curves (paper-recipe.md §3: K in {1, 2, 4, 8, 16}).
pub const K_GRID: [u64; 5] = [1, 2, 4, 8, 16];

/// Group name used for items whose dataset or modality is empty.
pub const UNSPECIFIED: &str = "(unspecified)";

/// Metrics of one group of items.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupMetrics {
    /// Number of items.
    pub items: usize,
    /// Fewest samples any item of the group has (n); Pass@k is reported for k <= n.
    pub samples_per_item: u64,
    /// Greedy accuracy: fraction of items whose greedy completion is correct.
    pub acc_at_1: f64,
    /// Unbiased Pass@k (Chen et al. 2021) for each k of [`ks_for`] the group's n.
    pub pass_at_k: BTreeMap<u64, f64>,
    /// Fraction of items none of whose samples used the `<answer>` tag (the eval kit's format
    /// failure; the greedy completion decides for items without samples).
    pub format_failure_rate: f64,
    /// Fraction of items whose greedy completion did not use the `<answer>` tag.
    pub greedy_format_failure_rate: f64,
    /// Mean number of distinct non-empty predictions among an item's samples (as the kit counts).
    pub mean_unique_answers: f64,
}

impl GroupMetrics {
    /// Pass@K at the largest k reported, with that k; `None` without samples.
    pub fn support(&self) -> Option<(u64, f64)> {
        self.pass_at_k.iter().next_back().map(|(&k, &v)| (k, v))
    }
}

/// Metrics of a whole samples file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// All items together.
    pub overall: GroupMetrics,
    /// One entry per dataset name.
    pub by_dataset: BTreeMap<String, GroupMetrics>,
    /// One entry per modality.
    pub by_modality: BTreeMap<String, GroupMetrics>,
}

/// The k values reported for n samples per item: those of [`K_GRID`] up to n, and n itself, so
/// the kit's Pass@K (K = n) is always there.
pub fn ks_for(n: u64) -> Vec<u64> {
    let mut ks: Vec<u64> = K_GRID.iter().copied().filter(|&k| k <= n).collect();
    if n > 0 && !ks.contains(&n) {
        ks.push(n);
    }
    ks
}

/// Name an item is grouped under: the value, or [`UNSPECIFIED`] when empty.
pub fn group_name(value: &str) -> &str {
    if value.trim().is_empty() { UNSPECIFIED } else { value }
}

/// Items grouped under the [`group_name`] of `key`, groups in name order.
pub fn group_by<'a>(items: &'a [ItemSamples], key: fn(&ItemSamples) -> &str) -> BTreeMap<&'a str, Vec<&'a ItemSamples>> {
    let mut groups: BTreeMap<&str, Vec<&ItemSamples>> = BTreeMap::new();
    for item in items {
        groups.entry(group_name(key(item))).or_default().push(item);
    }
    groups
}

/// Metrics of one group of items (at least one).
pub fn group_metrics(items: &[&ItemSamples]) -> Result<GroupMetrics> {
    if items.is_empty() {
        return Err(EvalError::Data("metrics of an empty group".into()));
    }
    let count = items.len() as f64;
    let n_min = items.iter().map(|i| i.samples.len() as u64).min().unwrap_or(0);
    let n_max = items.iter().map(|i| i.samples.len() as u64).max().unwrap_or(0);
    if n_min != n_max {
        tracing::warn!("items have between {n_min} and {n_max} samples; Pass@k is reported up to k = {n_min}");
    }
    let counts: Vec<SampleCounts> =
        items.iter().map(|i| SampleCounts { samples: i.samples.len() as u64, correct: i.correct_samples() }).collect();
    let mut pass_at_k = BTreeMap::new();
    for k in ks_for(n_min) {
        pass_at_k.insert(k, mean_pass_at_k(&counts, k)?);
    }
    let fraction = |pred: &dyn Fn(&ItemSamples) -> bool| items.iter().filter(|i| pred(i)).count() as f64 / count;
    let format_failure = |i: &ItemSamples| {
        if i.samples.is_empty() { !i.greedy.format_ok } else { i.samples.iter().all(|s| !s.format_ok) }
    };
    let unique: usize = items
        .iter()
        .map(|i| i.samples.iter().filter(|s| !s.prediction.is_empty()).map(|s| s.prediction.as_str()).collect::<HashSet<_>>().len())
        .sum();
    Ok(GroupMetrics {
        items: items.len(),
        samples_per_item: n_min,
        acc_at_1: fraction(&|i| i.greedy.correct),
        pass_at_k,
        format_failure_rate: fraction(&format_failure),
        greedy_format_failure_rate: fraction(&|i| !i.greedy.format_ok),
        mean_unique_answers: unique as f64 / count,
    })
}

/// Metrics of all items, per dataset and per modality.
pub fn compute_metrics(items: &[ItemSamples]) -> Result<Metrics> {
    if items.is_empty() {
        return Err(EvalError::Data("the samples file has no items".into()));
    }
    let all: Vec<&ItemSamples> = items.iter().collect();
    let by = |key: fn(&ItemSamples) -> &str| -> Result<BTreeMap<String, GroupMetrics>> {
        group_by(items, key).into_iter().map(|(name, members)| Ok((name.to_owned(), group_metrics(&members)?))).collect()
    };
    Ok(Metrics { overall: group_metrics(&all)?, by_dataset: by(|i| &i.dataset)?, by_modality: by(|i| &i.modality)? })
}

/// A fraction as a percentage with two decimals.
pub fn percent(x: f64) -> String {
    format!("{:.2}", 100.0 * x)
}

impl Metrics {
    /// Every k reported in any group, ascending.
    pub fn all_ks(&self) -> Vec<u64> {
        let groups = std::iter::once(&self.overall).chain(self.by_dataset.values()).chain(self.by_modality.values());
        groups.flat_map(|g| g.pass_at_k.keys().copied()).collect::<BTreeSet<_>>().into_iter().collect()
    }

    /// The metrics as markdown: a legend, then one table with overall, per-dataset and
    /// per-modality rows (percentages).
    pub fn to_markdown(&self) -> String {
        let ks = self.all_ks();
        let mut md = String::from("# Evaluation metrics\n\n");
        md.push_str(
            "Acc@1 = greedy accuracy. pass@k = unbiased estimator of Chen et al. 2021 from the n samples per item \
             (sampled pass@1 is not greedy Acc@1). fmt fail = items with no `<answer>` tag in any sample (eval kit); \
             greedy fmt fail = the same for the greedy completion. unique = mean distinct non-empty answers among \
             the samples. All values in %, except items, n and unique.\n\n",
        );
        let _ = write!(md, "| group | items | n | Acc@1 |");
        for k in &ks {
            let _ = write!(md, " pass@{k} |");
        }
        md.push_str(" fmt fail | greedy fmt fail | unique |\n|---|---:|---:|---:|");
        md.push_str(&"---:|".repeat(ks.len() + 3));
        md.push('\n');
        let mut row = |label: String, g: &GroupMetrics| {
            let _ = write!(md, "| {label} | {} | {} | {} |", g.items, g.samples_per_item, percent(g.acc_at_1));
            for k in &ks {
                let cell = g.pass_at_k.get(k).map_or_else(|| "–".to_owned(), |v| percent(*v));
                let _ = write!(md, " {cell} |");
            }
            let _ = writeln!(
                md,
                " {} | {} | {:.2} |",
                percent(g.format_failure_rate),
                percent(g.greedy_format_failure_rate),
                g.mean_unique_answers
            );
        };
        row("**overall**".into(), &self.overall);
        for (name, g) in &self.by_dataset {
            row(format!("dataset: {}", escape_cell(name)), g);
        }
        for (name, g) in &self.by_modality {
            row(format!("modality: {}", escape_cell(name)), g);
        }
        md
    }

    /// Writes `metrics.json` and `metrics.md` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self).map_err(|e| EvalError::Data(e.to_string()))?;
        write_file(&dir.join("metrics.json"), &(json + "\n"))?;
        write_file(&dir.join("metrics.md"), &self.to_markdown())
    }
}

/// Makes a name safe inside a markdown table cell.
pub fn escape_cell(name: &str) -> String {
    name.replace('|', "\\|").replace('\n', " ")
}

/// Writes a whole file through a temporary file and a rename, so readers never see half of it.
pub fn write_file(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| EvalError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| EvalError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::samples::Judged;

    fn j(prediction: &str, correct: bool, format_ok: bool) -> Judged {
        Judged { text: String::new(), prediction: prediction.into(), correct, format_ok }
    }

    fn item(id: &str, dataset: &str, modality: &str, greedy: bool, samples: Vec<Judged>) -> ItemSamples {
        ItemSamples {
            id: id.into(),
            dataset: dataset.into(),
            modality: modality.into(),
            answer_label: Some("A".into()),
            answer: "a".into(),
            greedy: j(if greedy { "A" } else { "B" }, greedy, true),
            samples,
        }
    }

    #[test]
    fn ks_follow_the_grid_and_add_n() {
        assert_eq!(ks_for(16), vec![1, 2, 4, 8, 16]);
        assert_eq!(ks_for(4), vec![1, 2, 4]);
        assert_eq!(ks_for(6), vec![1, 2, 4, 6]);
        assert_eq!(ks_for(32), vec![1, 2, 4, 8, 16, 32]);
        assert!(ks_for(0).is_empty());
    }

    #[test]
    fn hand_computed_group() -> Result<()> {
        // n = 4. Item 1: c = 2 (A, A right; B, "" wrong). Item 2: c = 0, no tags at all.
        let items = vec![
            item("1", "ds1", "ct", true, vec![j("A", true, true), j("B", false, true), j("A", true, true), j("", false, false)]),
            item("2", "ds2", "", false, vec![j("C", false, false), j("C", false, false), j("D", false, false), j("", false, false)]),
        ];
        let m = compute_metrics(&items)?;
        let o = &m.overall;
        assert_eq!(o.items, 2);
        assert_eq!(o.samples_per_item, 4);
        assert_eq!(o.acc_at_1, 0.5);
        // pass@1 = (2/4 + 0) / 2; pass@2 = (1 - C(2,2)/C(4,2)) / 2 = (5/6) / 2; pass@4 = 1/2.
        assert_eq!(o.pass_at_k[&1], 0.25);
        assert!((o.pass_at_k[&2] - 5.0 / 12.0).abs() < 1e-15);
        assert_eq!(o.pass_at_k[&4], 0.5);
        assert_eq!(o.format_failure_rate, 0.5);
        assert_eq!(o.greedy_format_failure_rate, 0.0);
        // {A, B} and {C, D}: empty predictions are not answers.
        assert_eq!(o.mean_unique_answers, 2.0);
        assert_eq!(m.by_dataset.len(), 2);
        assert_eq!(m.by_modality.keys().collect::<Vec<_>>(), ["(unspecified)", "ct"]);
        assert_eq!(m.by_modality["ct"].acc_at_1, 1.0);
        assert_eq!(m.overall.support(), Some((4, 0.5)));
        Ok(())
    }

    #[test]
    fn markdown_has_every_group_and_k() -> Result<()> {
        let items = vec![item("1", "a|b", "mri", true, vec![j("A", true, true), j("B", false, true)])];
        let md = compute_metrics(&items)?.to_markdown();
        assert!(md.contains("| pass@1 | pass@2 |"), "{md}");
        assert!(md.contains("dataset: a\\|b"), "{md}");
        assert!(md.contains("| **overall** | 1 | 2 | 100.00 | 50.00 | 100.00 | 0.00 | 0.00 | 2.00 |"), "{md}");
        Ok(())
    }

    #[test]
    fn empty_input_is_an_error() {
        assert!(compute_metrics(&[]).is_err());
    }
}
