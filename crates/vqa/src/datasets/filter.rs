//! Keeping records by pass rate, read from the samples file `medrl eval` writes: one JSON object
//! per line, `{"id", "dataset", "modality", "answer_label", "answer", "greedy": {...},
//! "samples": [{"text", "prediction", "correct", "format_ok"}, ...]}`.
//!
//! Pass rate = correct samples / samples (the greedy answer does not count). Keeping rates in
//! `[min, max]` drops zero-support items (`min > 0`) and saturated ones (`max < 1`), the two
//! kinds on which GRPO's group advantage is zero. Every record that is not kept is counted in
//! [`FilterReport`] under its reason.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::record::{VqaRecord, for_each_line};

use super::DataError;

/// The part of one samples line that the filter reads; other fields are the eval's business.
#[derive(Debug, Deserialize)]
struct SamplesLine {
    id: String,
    #[serde(default)]
    answer_label: Option<String>,
    samples: Vec<SampleOutcome>,
}

/// One sampled completion's judgement.
#[derive(Debug, Deserialize)]
struct SampleOutcome {
    correct: Correct,
}

/// `correct` as a boolean, or as a 0 / 1 reward.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Correct {
    Bool(bool),
    Number(f64),
}

/// Correct and total samples of one item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleTally {
    /// Samples judged correct.
    pub correct: usize,
    /// Samples drawn.
    pub samples: usize,
}

impl SampleTally {
    /// Correct / samples; `None` when no sample was drawn.
    pub fn pass_rate(self) -> Option<f64> {
        (self.samples > 0).then(|| self.correct as f64 / self.samples as f64)
    }
}

/// Per-item sample tallies of one samples file, with the line each came from.
#[derive(Debug, Clone, Default)]
pub struct PassRates {
    /// The samples file.
    pub file: PathBuf,
    /// Tally, answer label and 1-based line per item id.
    pub items: HashMap<String, (SampleTally, Option<String>, usize)>,
}

/// Reads a samples file; a malformed line or a repeated id is an error naming the line.
pub fn read_pass_rates(path: &Path) -> Result<PassRates, DataError> {
    let mut rates = PassRates { file: path.to_path_buf(), ..Default::default() };
    for_each_line(path, |e| DataError::io(path, e), |line_no, line| {
        let row: SamplesLine = serde_json::from_str(line).map_err(|e| DataError::field(path, line_no, "(line)", e.to_string()))?;
        let mut correct = 0;
        for (i, s) in row.samples.iter().enumerate() {
            let ok = match s.correct {
                Correct::Bool(b) => b,
                Correct::Number(x) if x == 0.0 || x == 1.0 => x == 1.0,
                Correct::Number(x) => return Err(DataError::field(path, line_no, format!("samples[{i}].correct"), format!("expected true/false or 0/1, found {x}"))),
            };
            correct += usize::from(ok);
        }
        let tally = SampleTally { correct, samples: row.samples.len() };
        if let Some((_, _, first)) = rates.items.insert(row.id.clone(), (tally, row.answer_label, line_no)) {
            return Err(DataError::field(path, line_no, "id", format!("{} already on line {first}", row.id)));
        }
        Ok(())
    })?;
    Ok(rates)
}

/// The pass-rate window to keep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PassRateWindow {
    /// Lowest pass rate kept (inclusive).
    pub min: f64,
    /// Highest pass rate kept (inclusive).
    pub max: f64,
}

impl PassRateWindow {
    /// Checks `0 <= min <= max <= 1`.
    pub fn validate(&self) -> Result<(), DataError> {
        if !(0.0..=1.0).contains(&self.min) || !(0.0..=1.0).contains(&self.max) || self.min > self.max {
            return Err(DataError::Invalid(format!("pass-rate window [{}, {}] must satisfy 0 <= min <= max <= 1", self.min, self.max)));
        }
        Ok(())
    }
}

/// Records kept and dropped by a pass-rate filter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FilterReport {
    /// Input records.
    pub input: usize,
    /// Records kept.
    pub kept: usize,
    /// Dropped: pass rate below `min`.
    pub below_min: usize,
    /// Dropped: pass rate above `max`.
    pub above_max: usize,
    /// Dropped: no line for this id in the samples file.
    pub not_in_samples: usize,
    /// Dropped: the samples line has no samples, so no pass rate.
    pub no_samples: usize,
    /// Samples-file ids that match no record (not dropped records, but worth knowing).
    pub unknown_ids: usize,
}

impl fmt::Display for FilterReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "kept {} of {} records", self.kept, self.input)?;
        writeln!(f, "  dropped {:>7}  pass rate below min", self.below_min)?;
        writeln!(f, "  dropped {:>7}  pass rate above max", self.above_max)?;
        writeln!(f, "  dropped {:>7}  id not in the samples file", self.not_in_samples)?;
        writeln!(f, "  dropped {:>7}  no samples drawn", self.no_samples)?;
        write!(f, "  {} samples-file ids match no record", self.unknown_ids)
    }
}

/// Keeps the records whose pass rate lies in `window`, in input order.
///
/// A samples line whose `answer_label` differs from its record's is an error: the samples were
/// drawn for another file that happens to share ids.
pub fn filter_by_pass_rate(records: &[VqaRecord], rates: &PassRates, window: PassRateWindow) -> Result<(Vec<VqaRecord>, FilterReport), DataError> {
    window.validate()?;
    let mut report = FilterReport { input: records.len(), ..Default::default() };
    let mut kept = Vec::new();
    let mut matched = 0;
    for r in records {
        let Some((tally, label, line)) = rates.items.get(&r.id) else {
            report.not_in_samples += 1;
            continue;
        };
        matched += 1;
        if let (Some(a), Some(b)) = (label, &r.answer_label)
            && a != b
        {
            return Err(DataError::field(&rates.file, *line, "answer_label", format!("{a} but record {} has {b}: samples from another file?", r.id)));
        }
        match tally.pass_rate() {
            None => report.no_samples += 1,
            Some(p) if p < window.min => report.below_min += 1,
            Some(p) if p > window.max => report.above_max += 1,
            Some(_) => kept.push(r.clone()),
        }
    }
    report.kept = kept.len();
    report.unknown_ids = rates.items.len() - matched;
    Ok((kept, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> VqaRecord {
        VqaRecord {
            id: id.into(),
            dataset: "d".into(),
            modality: "m".into(),
            images: vec![],
            question: "q".into(),
            options: vec!["x".into(), "y".into()],
            answer_label: Some("A".into()),
            answer: "x".into(),
        }
    }

    fn line(id: &str, label: &str, outcomes: &[bool]) -> String {
        let samples: Vec<String> = outcomes
            .iter()
            .map(|c| format!(r#"{{"text":"<answer>A</answer>","prediction":"A","correct":{c},"format_ok":true}}"#))
            .collect();
        format!(
            r#"{{"id":"{id}","dataset":"d","modality":"m","answer_label":"{label}","answer":"x","greedy":{{"text":"t","prediction":"A","correct":true,"format_ok":true}},"samples":[{}]}}"#,
            samples.join(",")
        )
    }

    #[test]
    fn keeps_the_window_and_counts_the_rest() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("samples.jsonl");
        let lines = [
            line("zero", "A", &[false, false, false, false]),
            line("quarter", "A", &[true, false, false, false]),
            line("half", "A", &[true, true, false, false]),
            line("all", "A", &[true, true, true, true]),
            line("empty", "A", &[]),
            line("stranger", "A", &[true]),
        ];
        std::fs::write(&path, lines.join("\n")).expect("write");
        let rates = read_pass_rates(&path).expect("read");
        assert_eq!(rates.items["quarter"].0.pass_rate(), Some(0.25));
        let records: Vec<_> = ["zero", "quarter", "half", "all", "empty", "missing"].into_iter().map(record).collect();
        let (kept, report) = filter_by_pass_rate(&records, &rates, PassRateWindow { min: 0.25, max: 0.75 }).expect("filter");
        assert_eq!(kept.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), vec!["quarter", "half"]);
        assert_eq!(
            report,
            FilterReport { input: 6, kept: 2, below_min: 1, above_max: 1, not_in_samples: 1, no_samples: 1, unknown_ids: 1 }
        );
        let (kept, _) = filter_by_pass_rate(&records, &rates, PassRateWindow { min: 0.0, max: 1.0 }).expect("filter");
        assert_eq!(kept.len(), 4);
        assert!(filter_by_pass_rate(&records, &rates, PassRateWindow { min: 0.8, max: 0.2 }).is_err());
    }

    #[test]
    fn bad_samples_files_are_errors() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("s.jsonl");
        std::fs::write(&path, format!("{}\n{}\n", line("a", "A", &[true]), line("a", "A", &[false]))).expect("write");
        let msg = read_pass_rates(&path).expect_err("duplicate").to_string();
        assert!(msg.contains("s.jsonl:2") && msg.contains("`id`"), "{msg}");
        std::fs::write(&path, r#"{"id":"a","samples":[{"correct":0.5}]}"#).expect("write");
        let msg = read_pass_rates(&path).expect_err("fractional").to_string();
        assert!(msg.contains("s.jsonl:1") && msg.contains("samples[0].correct"), "{msg}");
        std::fs::write(&path, r#"{"id":"a"}"#).expect("write");
        assert!(read_pass_rates(&path).expect_err("no samples key").to_string().contains("samples"));
        std::fs::write(&path, line("a", "B", &[true])).expect("write");
        let rates = read_pass_rates(&path).expect("read");
        let msg = filter_by_pass_rate(&[record("a")], &rates, PassRateWindow { min: 0.0, max: 1.0 }).expect_err("label").to_string();
        assert!(msg.contains("answer_label"), "{msg}");
    }
}
