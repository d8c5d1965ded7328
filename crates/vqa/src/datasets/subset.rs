//! The paper's "small, balanced subset" (`paper-recipe.md` §9): pick `size` records so that every
//! cell of the chosen balance fields (answer letter by default, optionally also dataset and/or
//! modality, taken jointly) gets as equal a share as the data allows, with a seeded shuffle.
//!
//! The paper does not say what it balanced on; answer-letter balance is our default because a
//! letter-skewed RL set rewards a letter prior instead of reading the image.
//!
//! Shares are filled like water: a cell with fewer records than its even share gives them all,
//! and the rest is spread over the larger cells, so the result has the requested size whenever
//! the input has that many records. Same input, spec and seed give the same subset, in the same
//! (shuffled) order.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::record::VqaRecord;

/// A record field that a subset can be balanced on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BalanceField {
    /// The answer letter (`none` for open questions).
    AnswerLabel,
    /// The `dataset` field.
    Dataset,
    /// The `modality` field (the task family for synthetic data).
    Modality,
}

impl BalanceField {
    /// The value of this field in `record`, as the balance cell key.
    pub fn value(self, record: &VqaRecord) -> String {
        match self {
            Self::AnswerLabel => record.answer_label.clone().unwrap_or_else(|| "none".into()),
            Self::Dataset => record.dataset.clone(),
            Self::Modality => record.modality.clone(),
        }
    }

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::AnswerLabel => "answer",
            Self::Dataset => "dataset",
            Self::Modality => "modality",
        }
    }
}

impl FromStr for BalanceField {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "answer" | "answer_label" | "letter" => Ok(Self::AnswerLabel),
            "dataset" => Ok(Self::Dataset),
            "modality" | "family" => Ok(Self::Modality),
            other => Err(format!("unknown balance field {other:?}; expected answer, dataset or modality")),
        }
    }
}

/// What subset to draw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubsetSpec {
    /// Number of records wanted.
    pub size: usize,
    /// Seed of the shuffles.
    pub seed: u64,
    /// Fields balanced jointly; empty means a plain seeded sample.
    pub by: Vec<BalanceField>,
}

/// One balance cell of a subset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellCount {
    /// The cell's values, one per balance field.
    pub key: Vec<String>,
    /// Records of the input in this cell.
    pub available: usize,
    /// Records taken from it.
    pub taken: usize,
}

/// How a subset was drawn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubsetReport {
    /// The balance fields.
    pub by: Vec<BalanceField>,
    /// Input records.
    pub available: usize,
    /// Records asked for.
    pub requested: usize,
    /// Records in the subset (less than `requested` only when the input is smaller).
    pub selected: usize,
    /// Every cell, in key order.
    pub cells: Vec<CellCount>,
}

impl fmt::Display for SubsetReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.by.iter().map(|b| b.name()).collect();
        writeln!(f, "subset of {} from {} records (asked {}), balanced by [{}]", self.selected, self.available, self.requested, names.join(", "))?;
        for c in &self.cells {
            writeln!(f, "  {:<40} {:>7} of {:>7}", c.key.join(" / "), c.taken, c.available)?;
        }
        Ok(())
    }
}

/// Even shares of `total` over cells holding `available[i]` items each, filled like water: a
/// cell never gets more than it has, no two cells that are not full differ by more than one, and
/// the shares add up to `min(total, sum(available))`. Ties go to later cells.
pub fn balanced_quotas(available: &[usize], total: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..available.len()).collect();
    // Smallest cells first, so what they cannot fill is known before the big ones are served.
    order.sort_by_key(|&i| (available[i], i));
    let mut quotas = vec![0; available.len()];
    let mut remaining = total.min(available.iter().sum());
    for (done, &i) in order.iter().enumerate() {
        let share = remaining / (order.len() - done);
        quotas[i] = share.min(available[i]);
        remaining -= quotas[i];
    }
    quotas
}

/// Draws a balanced subset; records are cloned, the input is untouched.
pub fn balanced_subset(records: &[VqaRecord], spec: &SubsetSpec) -> (Vec<VqaRecord>, SubsetReport) {
    let mut cells: BTreeMap<Vec<String>, Vec<usize>> = BTreeMap::new();
    for (i, r) in records.iter().enumerate() {
        cells.entry(spec.by.iter().map(|b| b.value(r)).collect()).or_default().push(i);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let sizes: Vec<usize> = cells.values().map(Vec::len).collect();
    let quotas = balanced_quotas(&sizes, spec.size);
    let mut chosen = Vec::with_capacity(spec.size.min(records.len()));
    let mut counts = Vec::with_capacity(cells.len());
    for ((key, mut members), quota) in cells.into_iter().zip(quotas) {
        members.shuffle(&mut rng);
        chosen.extend_from_slice(&members[..quota]);
        counts.push(CellCount { key, available: members.len(), taken: quota });
    }
    // Cells were appended one after another; shuffle so a training pass does not see them in
    // blocks.
    chosen.shuffle(&mut rng);
    let report = SubsetReport { by: spec.by.clone(), available: records.len(), requested: spec.size, selected: chosen.len(), cells: counts };
    (chosen.into_iter().map(|i| records[i].clone()).collect(), report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: usize, label: &str, modality: &str) -> VqaRecord {
        VqaRecord {
            id: format!("r/{i}"),
            dataset: "d".into(),
            modality: modality.into(),
            images: vec![],
            question: "q".into(),
            options: vec!["a".into(), "b".into(), "c".into(), "d".into()],
            answer_label: Some(label.into()),
            answer: ["a", "b", "c", "d"][(label.as_bytes()[0] - b'A') as usize].into(),
        }
    }

    /// 100 records skewed towards A (70 A, 20 B, 7 C, 3 D), modality alternating x / y.
    fn skewed() -> Vec<VqaRecord> {
        (0..100)
            .map(|i| {
                let label = match i {
                    0..70 => "A",
                    70..90 => "B",
                    90..97 => "C",
                    _ => "D",
                };
                record(i, label, if i % 2 == 0 { "x" } else { "y" })
            })
            .collect()
    }

    fn count(records: &[VqaRecord], f: impl Fn(&VqaRecord) -> String) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for r in records {
            *m.entry(f(r)).or_default() += 1;
        }
        m
    }

    #[test]
    fn quotas_fill_like_water() {
        assert_eq!(balanced_quotas(&[100, 100, 100], 10), vec![3, 3, 4]);
        assert_eq!(balanced_quotas(&[70, 20, 7, 3], 40), vec![15, 15, 7, 3]);
        assert_eq!(balanced_quotas(&[2, 2], 10), vec![2, 2]);
        assert_eq!(balanced_quotas(&[], 10), Vec::<usize>::new());
        assert_eq!(balanced_quotas(&[5, 5], 0), vec![0, 0]);
    }

    #[test]
    fn balances_letters_and_is_deterministic() {
        let data = skewed();
        let spec = SubsetSpec { size: 40, seed: 7, by: vec![BalanceField::AnswerLabel] };
        let (a, report) = balanced_subset(&data, &spec);
        let (b, _) = balanced_subset(&data, &spec);
        assert_eq!(a, b, "same seed, same subset and order");
        assert_eq!(a.len(), 40);
        let letters = count(&a, |r| r.answer_label.clone().unwrap_or_default());
        assert_eq!(letters.values().copied().collect::<Vec<_>>(), vec![15, 15, 7, 3]);
        assert_eq!(report.cells.iter().map(|c| c.taken).sum::<usize>(), 40);
        let ids: std::collections::HashSet<_> = a.iter().map(|r| &r.id).collect();
        assert_eq!(ids.len(), 40, "no record twice");
        let (c, _) = balanced_subset(&data, &SubsetSpec { seed: 8, ..spec });
        assert_ne!(a, c, "another seed, another draw");
    }

    #[test]
    fn joint_balance_and_oversized_requests() {
        let data = skewed();
        // D has one `x` record (98), so 8 is the largest size where every cell can give the same.
        let spec = SubsetSpec { size: 8, seed: 1, by: vec![BalanceField::AnswerLabel, BalanceField::Modality] };
        let (a, report) = balanced_subset(&data, &spec);
        assert_eq!(report.cells.len(), 8);
        let joint = count(&a, |r| format!("{}{}", r.answer_label.clone().unwrap_or_default(), r.modality));
        assert!(joint.len() == 8 && joint.values().all(|&n| n == 1), "{joint:?}");
        let (all, report) = balanced_subset(&data, &SubsetSpec { size: 1000, seed: 1, by: vec![BalanceField::Modality] });
        assert_eq!((all.len(), report.selected, report.requested), (100, 100, 1000));
        assert!(report.to_string().contains("subset of 100 from 100 records (asked 1000)"));
    }

    #[test]
    fn field_names_parse() {
        assert_eq!("answer".parse::<BalanceField>(), Ok(BalanceField::AnswerLabel));
        assert_eq!("modality".parse::<BalanceField>(), Ok(BalanceField::Modality));
        assert!("colour".parse::<BalanceField>().is_err());
    }
}
