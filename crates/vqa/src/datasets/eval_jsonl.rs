//! The MedBridgeRL eval kit's JSONL export of MedVLThinker-Eval (`export_eval_data_to_jsonl.py`,
//! `datasets.md` §9.3) to records: one object per line with `dataset_name, dataset_index,
//! image_paths, question, options, answer_label, answer` (and `options_dict`).
//!
//! `options` is taken as a list (A, B, ... order), a letter -> text object, or a string holding
//! such an object (the Hugging Face table stores it that way), so exports from either side load.
//! The gold is the letter: when `answer` is not exactly the text of the labelled option (yes/no
//! items were labelled by a case-insensitive match) the record's answer becomes the option text
//! and the row is counted in the report. Fields beyond the listed ones are ignored.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::record::{VqaRecord, for_each_line, label_index};

use super::DataError;

/// One line of the export, as written by the kit.
#[derive(Debug, Deserialize)]
struct ExportRow {
    dataset_name: String,
    dataset_index: Value,
    #[serde(default)]
    image_paths: Vec<String>,
    question: String,
    #[serde(default)]
    options: Value,
    #[serde(default)]
    options_dict: Value,
    #[serde(default)]
    answer_label: Option<String>,
    answer: Value,
}

/// What loading an export did besides turning each line into a record.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EvalJsonlReport {
    /// The JSONL file.
    pub file: PathBuf,
    /// Records read (all lines become records; bad lines are errors).
    pub rows: usize,
    /// Rows whose `answer` differed from the labelled option's text and was replaced by it.
    pub answer_set_from_option: usize,
    /// The first few line numbers of such rows.
    pub example_lines: Vec<usize>,
    /// Rows per `dataset_name`.
    pub per_dataset: BTreeMap<String, usize>,
}

/// Options of a row from a list, a letter -> text object, or a string holding either.
fn parse_options(value: &Value) -> Result<Vec<String>, String> {
    match value {
        Value::Null => Ok(Vec::new()),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, v)| v.as_str().map(str::to_owned).ok_or_else(|| format!("option {i} is not a string: {v}")))
            .collect(),
        Value::Object(map) => {
            let mut by_index = BTreeMap::new();
            for (letter, text) in map {
                let i = label_index(letter).ok_or_else(|| format!("key {letter:?} is not an option letter"))?;
                let text = text.as_str().ok_or_else(|| format!("option {letter} is not a string: {text}"))?;
                by_index.insert(i, text.to_owned());
            }
            // Letters must run A, B, C, ... without a gap, or option positions would be ambiguous.
            if by_index.keys().enumerate().any(|(expected, i)| expected != *i) {
                return Err(format!("option letters {:?} are not consecutive from A", map.keys().collect::<Vec<_>>()));
            }
            Ok(by_index.into_values().collect())
        }
        Value::String(s) if s.trim().is_empty() => Ok(Vec::new()),
        Value::String(s) => {
            let inner: Value = serde_json::from_str(s).map_err(|e| format!("a string that is not JSON options: {e}"))?;
            match inner {
                Value::String(_) => Err("a string holding a string".into()),
                other => parse_options(&other),
            }
        }
        other => Err(format!("expected a list or an object, found {other}")),
    }
}

/// `dataset_index` as text (the export writes integers; strings are accepted as they are).
fn index_text(v: &Value) -> Result<String, String> {
    match v {
        Value::Number(n) => Ok(n.to_string()),
        Value::String(s) if !s.is_empty() => Ok(s.clone()),
        other => Err(format!("expected an integer or a non-empty string, found {other}")),
    }
}

/// Reads an eval-kit export; image paths are kept as written (relative to the file's folder).
pub fn load_eval_jsonl(path: &Path) -> Result<(Vec<VqaRecord>, EvalJsonlReport), DataError> {
    let mut report = EvalJsonlReport { file: path.to_path_buf(), ..Default::default() };
    let mut records = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for_each_line(path, |e| DataError::io(path, e), |line_no, line| {
        let bad = |field: &str, problem: String| DataError::field(path, line_no, field, problem);
        let row: ExportRow = serde_json::from_str(line).map_err(|e| bad("(line)", e.to_string()))?;
        let index = index_text(&row.dataset_index).map_err(|p| bad("dataset_index", p))?;
        let mut options = parse_options(&row.options).map_err(|p| bad("options", p))?;
        if options.is_empty() {
            options = parse_options(&row.options_dict).map_err(|p| bad("options_dict", p))?;
        }
        let mut answer = match &row.answer {
            Value::String(s) => s.clone(),
            // Yes/no and numeric answers sometimes arrive as JSON scalars.
            Value::Bool(_) | Value::Number(_) => row.answer.to_string(),
            other => return Err(bad("answer", format!("expected a string, found {other}"))),
        };
        let label = row.answer_label.map(|l| l.trim().to_owned()).filter(|l| !l.is_empty());
        match (&label, options.is_empty()) {
            (None, false) => return Err(bad("answer_label", "missing but the row has options".into())),
            (Some(l), _) => {
                let i = label_index(l).ok_or_else(|| bad("answer_label", format!("{l:?} is not an option letter")))?;
                let option = options.get(i).ok_or_else(|| bad("answer_label", format!("{l} but the row has {} options", options.len())))?;
                if *option != answer {
                    report.answer_set_from_option += 1;
                    if report.example_lines.len() < 5 {
                        report.example_lines.push(line_no);
                    }
                    answer = option.clone();
                }
            }
            (None, true) => {}
        }
        let id = format!("{}/{index}", row.dataset_name);
        if let Some(first) = seen.insert(id.clone(), line_no) {
            return Err(bad("dataset_index", format!("id {id} repeats line {first}")));
        }
        *report.per_dataset.entry(row.dataset_name.clone()).or_default() += 1;
        records.push(VqaRecord {
            id,
            dataset: row.dataset_name,
            // The benchmarks carry no common modality field.
            modality: String::new(),
            images: row.image_paths,
            question: row.question,
            options,
            answer_label: label,
            answer,
        });
        Ok(())
    })?;
    report.rows = records.len();
    Ok((records, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, lines: &[String]) -> PathBuf {
        let p = dir.join("data.jsonl");
        std::fs::write(&p, lines.join("\n") + "\n").expect("write");
        p
    }

    #[test]
    fn loads_list_dict_and_string_options() {
        let dir = tempfile::tempdir().expect("tmp");
        let lines = vec![
            r#"{"dataset_name":"pmc_vqa","dataset_index":0,"image_paths":["images/pmc_vqa_0_0.png"],"question":"Q0","options_dict":{"A":"x","B":"y"},"options":["x","y"],"answer_label":"B","answer":"y"}"#.to_string(),
            r#"{"dataset_name":"path_vqa","dataset_index":7,"image_paths":["images/path_vqa_7_0.png"],"question":"Is it?","options":{"B":"No","A":"Yes"},"answer_label":"A","answer":"yes"}"#.to_string(),
            String::new(),
            r#"{"dataset_name":"slake","dataset_index":"3","image_paths":[],"question":"Q","options":"{\"A\": \"left\", \"B\": \"right\"}","answer_label":"B","answer":"right","hash":"h"}"#.to_string(),
        ];
        let (records, report) = load_eval_jsonl(&write(dir.path(), &lines)).expect("loads");
        assert_eq!(records.len(), 3);
        assert_eq!(records[0].id, "pmc_vqa/0");
        assert_eq!(records[0].images, vec!["images/pmc_vqa_0_0.png"]);
        assert_eq!(records[1].options, vec!["Yes", "No"]);
        assert_eq!(records[1].answer, "Yes");
        assert_eq!(records[2].options, vec!["left", "right"]);
        assert_eq!((report.rows, report.answer_set_from_option), (3, 1));
        assert_eq!(report.example_lines, vec![2]);
        assert_eq!(report.per_dataset["slake"], 1);
        assert!(records.iter().all(|r| r.validate().is_ok()));
    }

    #[test]
    fn bad_rows_are_errors_naming_line_and_field() {
        let dir = tempfile::tempdir().expect("tmp");
        let good = r#"{"dataset_name":"d","dataset_index":1,"image_paths":[],"question":"Q","options":["x","y"],"answer_label":"A","answer":"x"}"#;
        let cases = [
            (r#"{"dataset_name":"d","dataset_index":2,"image_paths":[],"question":"Q","options":["x","y"],"answer_label":"C","answer":"x"}"#, "answer_label"),
            (r#"{"dataset_name":"d","dataset_index":2,"image_paths":[],"question":"Q","options":["x","y"],"answer":"x"}"#, "answer_label"),
            (r#"{"dataset_name":"d","dataset_index":2,"image_paths":[],"question":"Q","options":{"A":"x","C":"y"},"answer_label":"A","answer":"x"}"#, "options"),
            (r#"{"dataset_name":"d","dataset_index":1,"image_paths":[],"question":"Q","options":["x","y"],"answer_label":"A","answer":"x"}"#, "dataset_index"),
            (r#"{"dataset_name":"d","dataset_index":2,"image_paths":[],"options":["x"],"answer_label":"A","answer":"x"}"#, "question"),
            ("not json", "(line)"),
        ];
        for (bad, field) in cases {
            let path = write(dir.path(), &[good.to_string(), bad.to_string()]);
            let msg = load_eval_jsonl(&path).expect_err(field).to_string();
            assert!(msg.contains("data.jsonl:2") && msg.contains(field), "{msg}");
        }
    }
}
