//! PMC-VQA CSV files (v1 `train.csv`, `test.csv`, `test_clean.csv`; v2 `train2.csv`, `test2.csv`)
//! to records, cleaned the way MedVLThinker prepared its training set (`datasets.md` §1):
//!
//! - every text cell is stripped of whitespace, quotes, NBSP and hair spaces at both ends;
//! - each `Choice X` cell is split at its first `:`; the prefix must be the letter `X` and the
//!   rest is the option text (`" B:Focal uptake" -> "Focal uptake"`);
//! - `Answer_label` must be one of A-D and `Answer` must equal the text of that option.
//!
//! A row failing any rule is dropped and counted by reason in [`PmcVqaReport`]; a file that is
//! not valid CSV, or lacks a needed column, is an error naming the file, line and field.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::record::VqaRecord;

use super::DataError;

/// The `dataset` value of PMC-VQA records.
pub const DATASET: &str = "PMC-VQA";

/// Option letters of PMC-VQA, which always has four choices.
const LETTERS: [&str; 4] = ["A", "B", "C", "D"];

/// Columns every PMC-VQA CSV version has; others (an unnamed index, `Caption`, `split`) are ignored.
const NEEDED: [&str; 8] = ["Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C", "Choice D", "Answer_label"];

/// Why a row was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    /// A `Choice X` cell has no `:`, so it has no letter prefix to check and strip.
    ChoiceWithoutColon,
    /// The prefix of `Choice X` is not the letter `X`.
    ChoicePrefixMismatch,
    /// `Answer_label` is not one of A-D.
    UnknownAnswerLabel,
    /// `Answer` is not the text of the option that `Answer_label` selects.
    AnswerNotChosenOption,
    /// `Figure_path` is empty (our addition: such a row has no image at all).
    EmptyFigurePath,
    /// The image is not in the image folder (only checked when one is given).
    MissingImage,
}

impl DropReason {
    /// Short human description, as printed in the report.
    pub fn describe(self) -> &'static str {
        match self {
            Self::ChoiceWithoutColon => "a `Choice X` cell has no `X:` prefix",
            Self::ChoicePrefixMismatch => "the prefix of `Choice X` is not X",
            Self::UnknownAnswerLabel => "`Answer_label` is not one of A-D",
            Self::AnswerNotChosenOption => "`Answer` differs from the option `Answer_label` selects",
            Self::EmptyFigurePath => "`Figure_path` is empty",
            Self::MissingImage => "image file not found",
        }
    }
}

/// What loading one CSV kept and dropped.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PmcVqaReport {
    /// The CSV file.
    pub file: PathBuf,
    /// Data rows read (header excluded).
    pub rows: usize,
    /// Rows turned into records.
    pub kept: usize,
    /// Dropped rows per reason.
    pub dropped: BTreeMap<DropReason, usize>,
    /// The first few CSV line numbers of each reason, so a person can look at them.
    pub example_lines: BTreeMap<DropReason, Vec<u64>>,
}

/// How many example line numbers the report keeps per reason.
const EXAMPLES_PER_REASON: usize = 5;

impl PmcVqaReport {
    /// Total dropped rows.
    pub fn dropped_total(&self) -> usize {
        self.dropped.values().sum()
    }

    fn drop_row(&mut self, reason: DropReason, line: u64) {
        *self.dropped.entry(reason).or_default() += 1;
        let examples = self.example_lines.entry(reason).or_default();
        if examples.len() < EXAMPLES_PER_REASON {
            examples.push(line);
        }
    }
}

impl fmt::Display for PmcVqaReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}: {} rows, {} kept, {} dropped", self.file.display(), self.rows, self.kept, self.dropped_total())?;
        for (reason, n) in &self.dropped {
            let lines: Vec<String> = self.example_lines.get(reason).map(|v| v.iter().map(u64::to_string).collect()).unwrap_or_default();
            writeln!(f, "  {n:>8}  {} (e.g. lines {})", reason.describe(), lines.join(", "))?;
        }
        Ok(())
    }
}

/// How records are built from the CSV rows.
#[derive(Debug, Clone, Default)]
pub struct PmcVqaOptions {
    /// Prefix joined to `Figure_path` to make the record's image path (relative to the output
    /// JSONL's folder, or absolute); empty keeps `Figure_path` as it is.
    pub image_prefix: String,
    /// When set, rows whose `Figure_path` is not a file in this folder are dropped and counted.
    pub check_images_in: Option<PathBuf>,
    /// Split name used in record ids; `None` takes the CSV file stem (`train2`, `test_clean`).
    pub split: Option<String>,
}

/// Python's `string.whitespace` plus the quote, NBSP and hair-space characters that MedVLThinker
/// also strips from PMC-VQA cells.
fn is_strippable(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c' | '\'' | '"' | '\u{a0}' | '\u{200a}')
}

/// A cell stripped at both ends the way the cleaning rule strips it.
pub fn clean_text(s: &str) -> &str {
    s.trim_matches(is_strippable)
}

/// The option text of `Choice X` after removing the `X:` prefix, or why the row must be dropped.
pub fn strip_choice_prefix<'a>(cell: &'a str, letter: &str) -> Result<&'a str, DropReason> {
    let (prefix, text) = clean_text(cell).split_once(':').ok_or(DropReason::ChoiceWithoutColon)?;
    if clean_text(prefix) != letter {
        return Err(DropReason::ChoicePrefixMismatch);
    }
    Ok(clean_text(text))
}

/// The four options, label and answer of one row after cleaning, or the first rule it breaks.
fn clean_row(cells: &[&str; 8]) -> Result<(Vec<String>, String, String), DropReason> {
    let [_, _, answer, a, b, c, d, label] = *cells;
    let mut options = Vec::with_capacity(4);
    for (cell, letter) in [a, b, c, d].into_iter().zip(LETTERS) {
        options.push(strip_choice_prefix(cell, letter)?.to_owned());
    }
    let label = clean_text(label);
    let index = LETTERS.iter().position(|l| *l == label).ok_or(DropReason::UnknownAnswerLabel)?;
    let answer = clean_text(answer);
    if options[index] != answer {
        return Err(DropReason::AnswerNotChosenOption);
    }
    Ok((options, label.to_owned(), answer.to_owned()))
}

/// Reads one PMC-VQA CSV; returns the kept records (in file order) and the drop report.
pub fn load_pmc_vqa(csv_path: &Path, opts: &PmcVqaOptions) -> Result<(Vec<VqaRecord>, PmcVqaReport), DataError> {
    let file = std::fs::File::open(csv_path).map_err(|e| DataError::io(csv_path, e))?;
    let mut reader = csv::ReaderBuilder::new().has_headers(true).flexible(false).from_reader(file);
    let header = reader.headers().map_err(|e| csv_error(csv_path, e, None))?.clone();
    let mut columns = [0usize; 8];
    let mut missing = Vec::new();
    for (slot, name) in columns.iter_mut().zip(NEEDED) {
        match header.iter().position(|h| clean_text(h) == name) {
            Some(i) => *slot = i,
            None => missing.push(name),
        }
    }
    if !missing.is_empty() {
        return Err(DataError::file(csv_path, format!("missing column(s) {missing:?}; header is {:?}", header.iter().collect::<Vec<_>>())));
    }
    let split = match &opts.split {
        Some(s) => s.clone(),
        None => csv_path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "pmc".into()),
    };

    let mut report = PmcVqaReport { file: csv_path.to_path_buf(), ..Default::default() };
    let mut records = Vec::new();
    for (row_index, row) in reader.records().enumerate() {
        let row = row.map_err(|e| csv_error(csv_path, e, Some(&header)))?;
        let line = row.position().map(|p| p.line()).unwrap_or(0);
        report.rows += 1;
        // `flexible(false)` guarantees every row has the header's width, so the indexes exist;
        // `unwrap_or("")` only keeps this free of panics.
        let cells = columns.map(|i| row.get(i).unwrap_or(""));
        let (options, label, answer) = match clean_row(&cells) {
            Ok(parts) => parts,
            Err(reason) => {
                report.drop_row(reason, line);
                continue;
            }
        };
        let figure = clean_text(cells[0]);
        if figure.is_empty() {
            report.drop_row(DropReason::EmptyFigurePath, line);
            continue;
        }
        if let Some(dir) = &opts.check_images_in
            && !dir.join(figure).is_file()
        {
            report.drop_row(DropReason::MissingImage, line);
            continue;
        }
        let image = if opts.image_prefix.is_empty() { figure.to_owned() } else { format!("{}/{figure}", opts.image_prefix.trim_end_matches('/')) };
        records.push(VqaRecord {
            id: format!("pmc-vqa/{split}/{row_index}"),
            dataset: DATASET.into(),
            // PMC-VQA rows carry no modality label.
            modality: String::new(),
            images: vec![image],
            question: clean_text(cells[1]).to_owned(),
            options,
            answer_label: Some(label),
            answer,
        });
    }
    report.kept = records.len();
    Ok((records, report))
}

/// A CSV-level failure as a [`DataError`] naming the line and, where known, the column.
fn csv_error(path: &Path, e: csv::Error, header: Option<&csv::StringRecord>) -> DataError {
    match e.kind() {
        csv::ErrorKind::Utf8 { pos, err } => {
            let column = header.and_then(|h| h.get(err.field())).map(str::to_owned).unwrap_or_else(|| format!("column {}", err.field() + 1));
            DataError::field(path, pos.as_ref().map_or(0, |p| p.line() as usize), column, "not valid UTF-8")
        }
        csv::ErrorKind::UnequalLengths { pos, expected_len, len } => DataError::field(
            path,
            pos.as_ref().map_or(0, |p| p.line() as usize),
            "(row)",
            format!("{len} fields but the header has {expected_len}"),
        ),
        csv::ErrorKind::Io(_) => DataError::file(path, e.to_string()),
        _ => DataError::file(path, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "Figure_path,Question,Answer,Choice A,Choice B,Choice C,Choice D,Answer_label\n";

    fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, body).expect("write csv");
        p
    }

    #[test]
    fn cleans_prefixes_and_counts_every_dropped_row() {
        let dir = tempfile::tempdir().expect("tmp");
        let body = format!(
            "{HEADER}\
             PMC1_F1.jpg, What uptake? ,Focal uptake,A:Diffuse uptake, B:Focal uptake ,C:No uptake,D:Rim,B\n\
             PMC2_F1.jpg,\"Which, with comma?\",\"x: y\",A:1,B:x: y,C:3,D:4,B\n\
             PMC3_F1.jpg,Q,one,A one,B:two,C:three,D:four,A\n\
             PMC4_F1.jpg,Q,one,A:one,C:two,C:three,D:four,A\n\
             PMC5_F1.jpg,Q,one,A:one,B:two,C:three,D:four,E\n\
             PMC6_F1.jpg,Q,two,A:one,B:two,C:three,D:four,A\n\
             ,Q,one,A:one,B:two,C:three,D:four,A\n\
             PMC8_F1.jpg,Q,'four'\u{a0},A:one,B:two,C:three,D:\"four\",D\n"
        );
        let path = write(dir.path(), "train.csv", &body);
        let opts = PmcVqaOptions { image_prefix: "images".into(), ..Default::default() };
        let (records, report) = load_pmc_vqa(&path, &opts).expect("loads");
        assert_eq!(report.rows, 8);
        assert_eq!(report.kept, 3);
        assert_eq!(records.len(), 3);
        assert_eq!(report.dropped_total(), 5);
        assert_eq!(report.dropped[&DropReason::ChoiceWithoutColon], 1);
        assert_eq!(report.dropped[&DropReason::ChoicePrefixMismatch], 1);
        assert_eq!(report.dropped[&DropReason::UnknownAnswerLabel], 1);
        assert_eq!(report.dropped[&DropReason::AnswerNotChosenOption], 1);
        assert_eq!(report.dropped[&DropReason::EmptyFigurePath], 1);
        assert_eq!(report.example_lines[&DropReason::ChoiceWithoutColon], vec![4]);

        let r = &records[0];
        assert_eq!(r.id, "pmc-vqa/train/0");
        assert_eq!(r.question, "What uptake?");
        assert_eq!(r.options, vec!["Diffuse uptake", "Focal uptake", "No uptake", "Rim"]);
        assert_eq!((r.answer_label.as_deref(), r.answer.as_str()), (Some("B"), "Focal uptake"));
        assert_eq!(r.images, vec!["images/PMC1_F1.jpg"]);
        // Only the first `:` separates the letter; the option text may hold more colons.
        assert_eq!(records[1].options[1], "x: y");
        assert_eq!(records[1].question, "Which, with comma?");
        // Quotes and NBSP are stripped from the answer and the options alike.
        assert_eq!((records[2].id.as_str(), records[2].answer.as_str()), ("pmc-vqa/train/7", "four"));
        assert!(records.iter().all(|r| r.validate().is_ok()));
        let text = report.to_string();
        assert!(text.contains("8 rows, 3 kept, 5 dropped") && text.contains("is not X"), "{text}");
    }

    #[test]
    fn v2_columns_in_any_order_and_missing_images() {
        let dir = tempfile::tempdir().expect("tmp");
        let images = dir.path().join("figures");
        std::fs::create_dir(&images).expect("mkdir");
        std::fs::write(images.join("a.jpg"), b"x").expect("img");
        let body = ",Figure_path,Caption,Question,Choice A,Choice B,Choice C,Choice D,Answer,Answer_label,split\n\
                    0,a.jpg,cap,Q1,A:x,B:y,C:z,D:w,y,B,train\n\
                    1,b.jpg,cap,Q2,A:x,B:y,C:z,D:w,w,D,train\n";
        let path = write(dir.path(), "train2.csv", body);
        let opts = PmcVqaOptions { check_images_in: Some(images), ..Default::default() };
        let (records, report) = load_pmc_vqa(&path, &opts).expect("loads");
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].id, "pmc-vqa/train2/0");
        assert_eq!(records[0].images, vec!["a.jpg"]);
        assert_eq!(report.dropped[&DropReason::MissingImage], 1);
    }

    #[test]
    fn structural_errors_name_file_line_and_field() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = write(dir.path(), "bad.csv", "Figure_path,Question,Answer,Choice A,Choice B,Choice C,Choice D\n");
        let msg = load_pmc_vqa(&path, &PmcVqaOptions::default()).expect_err("no label column").to_string();
        assert!(msg.contains("bad.csv") && msg.contains("Answer_label"), "{msg}");

        let path = write(dir.path(), "short.csv", &format!("{HEADER}a.jpg,Q,x,A:x,B:y,C:z,D:w,A\na.jpg,Q,x,A:x\n"));
        let msg = load_pmc_vqa(&path, &PmcVqaOptions::default()).expect_err("short row").to_string();
        assert!(msg.contains("short.csv:3") && msg.contains("4 fields but the header has 8"), "{msg}");

        let mut bytes = format!("{HEADER}a.jpg,").into_bytes();
        bytes.extend_from_slice(b"Q\xff,x,A:x,B:y,C:z,D:w,A\n");
        let path = dir.path().join("utf8.csv");
        std::fs::write(&path, bytes).expect("write");
        let msg = load_pmc_vqa(&path, &PmcVqaOptions::default()).expect_err("bad utf-8").to_string();
        assert!(msg.contains("utf8.csv:2") && msg.contains("`Question`"), "{msg}");

        let msg = load_pmc_vqa(&dir.path().join("absent.csv"), &PmcVqaOptions::default()).expect_err("absent").to_string();
        assert!(msg.contains("absent.csv"), "{msg}");
    }
}
