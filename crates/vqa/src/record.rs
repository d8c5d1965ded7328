//! The one record format every dataset is turned into: a multiple-choice (or open) VQA item with
//! its images, written one JSON object per line. Loaders produce it; the coordinator, eval and the
//! learner read it.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One VQA item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VqaRecord {
    /// Unique within its file (e.g. `pmc-vqa/train/12`, `pathmnist/test/3`).
    pub id: String,
    /// Dataset name, e.g. `PMC-VQA`, `pathmnist`, `synthetic`.
    pub dataset: String,
    /// Imaging modality or task family, the unit of per-modality metrics.
    #[serde(default)]
    pub modality: String,
    /// Image paths, relative to the JSONL file's folder (or absolute).
    #[serde(default)]
    pub images: Vec<String>,
    /// Question text without the options.
    pub question: String,
    /// Answer options in order; option i has letter `A + i`. Empty for open questions.
    #[serde(default)]
    pub options: Vec<String>,
    /// Letter of the correct option (`"B"`), when the item is multiple choice.
    #[serde(default)]
    pub answer_label: Option<String>,
    /// Text of the correct answer.
    pub answer: String,
}

/// Reading or writing records failed; names the file and line.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("{path}: {cause}")]
    Io { path: PathBuf, cause: std::io::Error },
    #[error("{path}:{line}: {problem}")]
    Line { path: PathBuf, line: usize, problem: String },
}

impl VqaRecord {
    /// The gold answer as the rewards and judges read it.
    pub fn gold(&self) -> crate::Gold<'_> {
        crate::Gold { answer: &self.answer, label: self.answer_label.as_deref(), options: &self.options }
    }

    /// Checks the fields that parsing alone cannot: a label that names an existing option, and an
    /// answer equal to that option's text.
    pub fn validate(&self) -> Result<(), String> {
        if self.id.is_empty() {
            return Err("field `id`: expected a non-empty string".into());
        }
        if let Some(label) = &self.answer_label {
            let index = label_index(label).ok_or_else(|| format!("field `answer_label`: expected one letter A-Z, found {label:?}"))?;
            match self.options.get(index) {
                None => return Err(format!("field `answer_label`: {label} but only {} options", self.options.len())),
                Some(opt) if opt != &self.answer => {
                    return Err(format!("field `answer`: {:?} is not option {label} ({opt:?})", self.answer));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Image paths resolved against the folder of the file the record came from.
    pub fn image_paths(&self, base: &Path) -> Vec<PathBuf> {
        self.images.iter().map(|p| base.join(p)).collect()
    }
}

/// Index of an option letter (`"A"` -> 0).
pub fn label_index(label: &str) -> Option<usize> {
    let mut chars = label.chars();
    match (chars.next(), chars.next()) {
        (Some(c @ 'A'..='Z'), None) => Some(c as usize - 'A' as usize),
        _ => None,
    }
}

/// Calls `row` with the 1-based number and the text of every non-blank line of `path`; `io`
/// turns a failure to open or read the file into the caller's error.
pub fn for_each_line<E>(path: &Path, io: impl Fn(std::io::Error) -> E, mut row: impl FnMut(usize, &str) -> Result<(), E>) -> Result<(), E> {
    let file = std::fs::File::open(path).map_err(&io)?;
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(&io)?;
        if !line.trim().is_empty() {
            row(n + 1, &line)?;
        }
    }
    Ok(())
}

/// Writes `path` through a temporary file (`<path>.jsonl.tmp`) and a rename, so readers never
/// see half of it; `body` writes the contents.
pub fn write_via_temp(path: &Path, body: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> std::io::Result<()> {
    let tmp = path.with_extension("jsonl.tmp");
    let mut w = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
    body(&mut w)?;
    w.flush()?;
    drop(w);
    std::fs::rename(&tmp, path)
}

/// Reads a JSONL file of records; a bad line is an error naming the file and the line.
pub fn read_records(path: &Path) -> Result<Vec<VqaRecord>, RecordError> {
    let mut out = Vec::new();
    for_each_line(path, |cause| RecordError::Io { path: path.to_path_buf(), cause }, |line_no, line| {
        let bad = |problem: String| RecordError::Line { path: path.to_path_buf(), line: line_no, problem };
        let record: VqaRecord = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        record.validate().map_err(bad)?;
        out.push(record);
        Ok(())
    })?;
    Ok(out)
}

/// Writes records as JSONL through a temporary file and a rename.
pub fn write_records(path: &Path, records: &[VqaRecord]) -> Result<(), RecordError> {
    write_via_temp(path, |w| {
        for r in records {
            let line = serde_json::to_string(r).map_err(std::io::Error::other)?;
            writeln!(w, "{line}")?;
        }
        Ok(())
    })
    .map_err(|cause| RecordError::Io { path: path.to_path_buf(), cause })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> VqaRecord {
        VqaRecord {
            id: "x/1".into(),
            dataset: "synthetic".into(),
            modality: "shape".into(),
            images: vec!["img/1.png".into()],
            question: "Which shape is shown?".into(),
            options: vec!["circle".into(), "square".into()],
            answer_label: Some("B".into()),
            answer: "square".into(),
        }
    }

    #[test]
    fn round_trip_and_line_errors() {
        let dir = std::env::temp_dir().join(format!("medrl-record-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("r.jsonl");
        write_records(&path, &[record(), record()]).expect("write");
        assert_eq!(read_records(&path).expect("read"), vec![record(), record()]);
        let mut bad = record();
        bad.answer = "circle".into();
        std::fs::write(&path, format!("{}\n{}\n", serde_json::to_string(&record()).expect("json"), serde_json::to_string(&bad).expect("json"))).expect("write");
        let msg = read_records(&path).expect_err("inconsistent").to_string();
        assert!(msg.contains("r.jsonl:2") && msg.contains("answer"), "{msg}");
        std::fs::write(&path, "{\"id\": 3}\n").expect("write");
        assert!(read_records(&path).expect_err("bad").to_string().contains("r.jsonl:1"));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn labels_map_to_option_indexes() {
        assert_eq!(label_index("A"), Some(0));
        assert_eq!(label_index("E"), Some(4));
        assert_eq!(label_index("a"), None);
        assert_eq!(label_index("AB"), None);
    }
}
