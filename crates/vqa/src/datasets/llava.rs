//! The LLaVA-style JSONL of the paper's RL run (`paper-recipe.md` §6), both ways:
//! `{"image": "<path>", "conversations": [{"from": "human", "value": "<image>question..."},
//! {"from": "gpt", "value": "<answer>X</answer>"}], ...}`.
//!
//! Reading follows the released `grpo.py`: the question is the first turn without `<image>`,
//! the gold is the second turn without the answer tags. Whether the released file put the
//! options inside the question, and whether its gold is a letter or a text, is unknown, so
//! reading accepts both: a trailing block of `A. text` / `A) text` / `(A) text` / `A: text` lines
//! (optionally after an `Options:` line) becomes the options, and a gold that is an option letter
//! or an option text becomes the label. Writing puts the options after the question the way the
//! `r1v` prompt template renders separate options (`\n\nOptions:\nA. ...`), so a written record
//! reads back to the same record, and keeps `id`, `dataset` and `modality` as extra keys.

use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use regex::Regex;
use serde_json::{Value, json};

use crate::record::{VqaRecord, for_each_line, label_index, write_via_temp};
use crate::template::{option_letter, option_lines};

use super::DataError;

/// What the gold turn of a written record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GoldForm {
    /// `<answer>B</answer>`: the option letter (the answer text for open questions).
    #[default]
    Letter,
    /// `<answer>Focal uptake</answer>`: the option text.
    Text,
}

/// What reading a LLaVA file found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LlavaReport {
    /// The file.
    pub file: PathBuf,
    /// Records read (every line becomes one; bad lines are errors).
    pub rows: usize,
    /// Rows whose question ended in an option block.
    pub with_options: usize,
    /// Rows whose gold was an option letter.
    pub letter_gold: usize,
    /// Rows whose gold was an option text.
    pub text_gold: usize,
    /// Rows with a one-letter gold but no option block: kept as open items whose answer is the
    /// letter, since the options they refer to are not in the text.
    pub letter_without_options: usize,
}

/// One option line: an optional `(`, the letter, `.`, `)` or `:`, then the text.
static OPTION_LINE: LazyLock<Option<Regex>> = LazyLock::new(|| Regex::new(r"^\s*\(?([A-Z])[.):]\s*(.*?)\s*$").ok());

/// Splits a question into the question proper and its trailing option block, if it has one of at
/// least two lines lettered A, B, C, ... in order.
pub fn split_options(text: &str) -> (String, Vec<String>) {
    let Some(re) = OPTION_LINE.as_ref() else {
        return (text.to_owned(), Vec::new());
    };
    let lines: Vec<&str> = text.lines().collect();
    let mut start = lines.len();
    let mut parsed = Vec::new();
    while start > 0 {
        match re.captures(lines[start - 1]) {
            Some(c) => {
                parsed.push((c[1].to_owned(), c[2].to_owned()));
                start -= 1;
            }
            None => break,
        }
    }
    parsed.reverse();
    // Keep the longest suffix that starts at A and runs on without a gap.
    let Some(first_a) = parsed.iter().rposition(|(l, _)| l == "A") else {
        return (text.to_owned(), Vec::new());
    };
    let block = &parsed[first_a..];
    let consecutive = block.iter().enumerate().all(|(i, (l, _))| option_letter(i).map(String::from).as_deref() == Some(l.as_str()));
    if block.len() < 2 || !consecutive {
        return (text.to_owned(), Vec::new());
    }
    let mut end = start + first_a;
    if end > 0 && lines[end - 1].trim().eq_ignore_ascii_case("options:") {
        end -= 1;
    }
    while end > 0 && lines[end - 1].trim().is_empty() {
        end -= 1;
    }
    (lines[..end].join("\n"), block.iter().map(|(_, t)| t.clone()).collect())
}

/// The question turn of a record: `<image>` per image, the question, then the option block.
pub fn question_turn(record: &VqaRecord) -> String {
    let mut text = "<image>".repeat(record.images.len());
    text.push_str(&record.question);
    if !record.options.is_empty() {
        text.push_str("\n\nOptions:\n");
        text.push_str(&option_lines(&record.options, "\n"));
    }
    text
}

/// One record as a LLaVA JSON object.
pub fn to_llava(record: &VqaRecord, gold: GoldForm) -> Value {
    let answer = match (gold, &record.answer_label) {
        (GoldForm::Letter, Some(label)) => label.as_str(),
        _ => record.answer.as_str(),
    };
    let image = match record.images.as_slice() {
        [one] => Value::String(one.clone()),
        many => json!(many),
    };
    json!({
        "id": record.id,
        "image": image,
        "conversations": [
            {"from": "human", "value": question_turn(record)},
            {"from": "gpt", "value": format!("<answer>{answer}</answer>")},
        ],
        "dataset": record.dataset,
        "modality": record.modality,
    })
}

/// Writes records as LLaVA JSONL (through a temporary file and a rename).
pub fn write_llava(path: &Path, records: &[VqaRecord], gold: GoldForm) -> Result<(), DataError> {
    write_via_temp(path, |w| {
        for r in records {
            writeln!(w, "{}", to_llava(r, gold))?;
        }
        Ok(())
    })
    .map_err(|e| DataError::io(path, e))
}

/// A string field of a LLaVA row, or an error naming it.
fn string_field<'a>(row: &'a Value, key: &str) -> Result<Option<&'a str>, String> {
    match row.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(format!("expected a string, found {other}")),
    }
}

/// Reads LLaVA JSONL into records. `dataset` names rows without a `dataset` key; rows without an
/// `id` get `<dataset>/<line>`.
pub fn load_llava(path: &Path, dataset: &str) -> Result<(Vec<VqaRecord>, LlavaReport), DataError> {
    let mut report = LlavaReport { file: path.to_path_buf(), ..Default::default() };
    let mut records = Vec::new();
    for_each_line(path, |e| DataError::io(path, e), |line_no, line| {
        let bad = |field: &str, problem: String| DataError::field(path, line_no, field, problem);
        let row: Value = serde_json::from_str(line).map_err(|e| bad("(line)", e.to_string()))?;
        let images = match row.get("image") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_str().map(str::to_owned).ok_or_else(|| bad("image", format!("list item {v} is not a string"))))
                .collect::<Result<_, _>>()?,
            Some(other) => return Err(bad("image", format!("expected a path or a list of paths, found {other}"))),
        };
        let turns = row.get("conversations").and_then(Value::as_array).ok_or_else(|| bad("conversations", "missing or not a list".into()))?;
        let turn = |i: usize| -> Result<&str, DataError> {
            let field = format!("conversations[{i}].value");
            turns.get(i).and_then(|t| t.get("value")).and_then(Value::as_str).ok_or_else(|| bad(&field, "missing or not a string".into()))
        };
        let (question, options) = split_options(&turn(0)?.replace("<image>", ""));
        let gold = turn(1)?.replace("<answer>", "").replace("</answer>", "");
        let gold = gold.trim();
        let (answer_label, answer) = if options.is_empty() {
            report.letter_without_options += usize::from(label_index(gold).is_some());
            (None, gold.to_owned())
        } else if let Some(i) = label_index(gold).filter(|&i| i < options.len()) {
            report.letter_gold += 1;
            (Some(gold.to_owned()), options[i].clone())
        } else {
            let matches: Vec<usize> = (0..options.len()).filter(|&i| options[i] == gold).collect();
            let [i] = matches[..] else {
                return Err(bad("conversations[1].value", format!("gold {gold:?} is neither an option letter nor exactly one option's text")));
            };
            report.text_gold += 1;
            (option_letter(i).map(String::from), options[i].clone())
        };
        report.with_options += usize::from(!options.is_empty());
        let text = |key: &str| string_field(&row, key).map_err(|p| bad(key, p));
        let dataset = text("dataset")?.unwrap_or(dataset).to_owned();
        let id = match text("id")? {
            Some(id) => id.to_owned(),
            None => format!("{dataset}/{line_no}"),
        };
        let record = VqaRecord { id, modality: text("modality")?.unwrap_or("").to_owned(), dataset, images, question, options, answer_label, answer };
        record.validate().map_err(|p| bad("(record)", p))?;
        records.push(record);
        Ok(())
    })?;
    report.rows = records.len();
    Ok((records, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> VqaRecord {
        VqaRecord {
            id: "pmc-vqa/train/3".into(),
            dataset: "PMC-VQA".into(),
            modality: String::new(),
            images: vec!["images/PMC1_F1.jpg".into()],
            question: "What uptake pattern is seen?".into(),
            options: vec!["Diffuse".into(), "Focal".into(), "None".into(), "Rim".into()],
            answer_label: Some("B".into()),
            answer: "Focal".into(),
        }
    }

    #[test]
    fn records_round_trip_with_letter_and_text_gold() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("rl.jsonl");
        let open = VqaRecord { id: "o/1".into(), options: vec![], answer_label: None, answer: "left lobe".into(), ..record() };
        for gold in [GoldForm::Letter, GoldForm::Text] {
            write_llava(&path, &[record(), open.clone()], gold).expect("write");
            let (back, report) = load_llava(&path, "x").expect("read");
            assert_eq!(back, vec![record(), open.clone()]);
            assert_eq!(report.with_options, 1);
            assert_eq!(report.letter_gold + report.text_gold, 1);
        }
        let v = to_llava(&record(), GoldForm::Letter);
        assert_eq!(v["conversations"][1]["value"], "<answer>B</answer>");
        assert_eq!(
            v["conversations"][0]["value"],
            "<image>What uptake pattern is seen?\n\nOptions:\nA. Diffuse\nB. Focal\nC. None\nD. Rim"
        );
    }

    #[test]
    fn reads_foreign_layouts() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("rl.jsonl");
        let lines = [
            r#"{"image":"a.png","conversations":[{"from":"human","value":"<image>\nWhich organ?\n(A) liver\n(B) spleen"},{"from":"gpt","value":"<answer> spleen </answer>"}]}"#,
            r#"{"image":["a.png","b.png"],"conversations":[{"value":"<image><image>Grade?\nA: 0\nB: 1\nC: 2"},{"value":"<answer>C</answer>"}],"extra":1}"#,
            r#"{"image":"c.png","conversations":[{"value":"<image>Q? A)x, B)y"},{"value":"<answer>B</answer>"}]}"#,
        ];
        std::fs::write(&path, lines.join("\n")).expect("write");
        let (records, report) = load_llava(&path, "pmc").expect("read");
        assert_eq!(records[0].question, "\nWhich organ?");
        assert_eq!(records[0].options, vec!["liver", "spleen"]);
        assert_eq!((records[0].answer_label.as_deref(), records[0].id.as_str()), (Some("B"), "pmc/1"));
        assert_eq!(records[1].images.len(), 2);
        assert_eq!(records[1].answer, "2");
        assert_eq!((records[2].answer_label.as_deref(), records[2].answer.as_str()), (None, "B"));
        assert_eq!(report, LlavaReport { file: path.clone(), rows: 3, with_options: 2, letter_gold: 1, text_gold: 1, letter_without_options: 1 });
    }

    #[test]
    fn bad_lines_name_line_and_field() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("rl.jsonl");
        let cases = [
            (r#"{"image":"a.png"}"#, "conversations"),
            (r#"{"image":"a.png","conversations":[{"value":"<image>Q"}]}"#, "conversations[1].value"),
            (r#"{"image":3,"conversations":[{"value":"Q"},{"value":"x"}]}"#, "image"),
            (r#"{"conversations":[{"value":"Q\nA. x\nB. y"},{"value":"<answer>z</answer>"}]}"#, "conversations[1].value"),
            (r#"{"id":7,"conversations":[{"value":"Q"},{"value":"x"}]}"#, "`id`"),
        ];
        for (line, field) in cases {
            std::fs::write(&path, format!("\n{line}\n")).expect("write");
            let msg = load_llava(&path, "d").expect_err(field).to_string();
            assert!(msg.contains("rl.jsonl:2") && msg.contains(field), "{msg}");
        }
    }

    #[test]
    fn option_blocks_need_consecutive_letters() {
        assert_eq!(split_options("Q\nA. x\nC. y"), ("Q\nA. x\nC. y".to_owned(), vec![]));
        assert_eq!(split_options("Q\nA. x"), ("Q\nA. x".to_owned(), vec![]));
        assert_eq!(split_options("Q\n\nOptions:\nA. x\nB. y"), ("Q".to_owned(), vec!["x".to_owned(), "y".to_owned()]));
    }
}
