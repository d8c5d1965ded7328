//! Evaluation config files (`configs/eval/*.yaml`, read by `medrl eval --config`): the run
//! config's `eval:` section plus what to evaluate. Unknown keys are errors at every level.

use std::path::PathBuf;

use medrl_vqa::VqaRecord;
use serde::{Deserialize, Serialize};

use crate::run::EvalConfig;

/// One evaluation config file.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalFile {
    /// What the config evaluates, for people reading it.
    pub description: String,
    /// VQA records (JSONL) to evaluate, as run configs give paths (relative to the working
    /// directory); `--data` overrides it.
    pub data: Option<PathBuf>,
    /// Datasets the records should hold; each one without a record is reported before the run.
    pub datasets: Vec<String>,
    /// Sampling and generation settings: the run config's `eval:` section.
    pub eval: EvalConfig,
}

/// Lower-case letters and digits only, so `VQA-RAD`, `vqa_rad` and `VQA_RAD` compare equal.
fn squash(name: &str) -> String {
    name.chars().filter(char::is_ascii_alphanumeric).map(|c| c.to_ascii_lowercase()).collect()
}

impl EvalFile {
    /// Expected datasets no record belongs to. Names compare ignoring case and punctuation, and
    /// an expected name also matches a dataset name containing it (`MMMU` matches
    /// `MMMU-Medical`), since exports name the same benchmark differently.
    pub fn missing_datasets(&self, records: &[VqaRecord]) -> Vec<String> {
        let present: std::collections::BTreeSet<String> = records.iter().map(|r| squash(&r.dataset)).collect();
        self.datasets
            .iter()
            .filter(|want| {
                let want = squash(want);
                !present.iter().any(|have| have.contains(&want))
            })
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_datasets_ignore_case_punctuation_and_suffixes() {
        let record = |dataset: &str| VqaRecord {
            id: dataset.into(),
            dataset: dataset.into(),
            modality: String::new(),
            images: Vec::new(),
            question: "Q?".into(),
            options: Vec::new(),
            answer_label: None,
            answer: "a".into(),
        };
        let file = EvalFile { datasets: ["VQA-RAD", "MMMU", "SLAKE", "PathVQA"].map(String::from).to_vec(), ..EvalFile::default() };
        let records = [record("vqa_rad"), record("MMMU-Medical"), record("path_vqa")];
        assert_eq!(file.missing_datasets(&records), vec!["SLAKE".to_string()]);
        assert!(EvalFile::default().missing_datasets(&[]).is_empty());
    }
}
