//! The samples file: one JSON object per evaluated item with its greedy completion and its n
//! sampled completions, each already judged. Metrics, reports, plots and `medrl data filter`
//! are all computed from this file alone, so its layout is a contract: keep it.
//!
//! It is written append-only, one flushed line per item, so a killed run loses at most the
//! line it was writing; a rerun reads the finished items, skips them, and appends the rest.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};

/// One completion and how the eval kit judged it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Judged {
    /// The decoded completion.
    pub text: String,
    /// Parsed answer: an option letter, or normalised free text; empty when nothing parsed.
    pub prediction: String,
    /// Whether the prediction equals the gold answer.
    pub correct: bool,
    /// Whether the completion used the `<answer>` tag (the kit's format criterion).
    pub format_ok: bool,
}

/// One evaluated item: its identity, gold answer, greedy completion and sampled completions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemSamples {
    /// Record id, unique within the evaluated file.
    pub id: String,
    /// Dataset name of the record.
    pub dataset: String,
    /// Modality of the record (may be empty).
    pub modality: String,
    /// Gold option letter of MCQ items; `null` for free-form items.
    pub answer_label: Option<String>,
    /// Gold answer text.
    pub answer: String,
    /// The greedy completion, the basis of Acc@1.
    pub greedy: Judged,
    /// The n sampled completions, the basis of Pass@k.
    pub samples: Vec<Judged>,
}

impl ItemSamples {
    /// Number of correct sampled completions (c in the Pass@k estimator).
    pub fn correct_samples(&self) -> u64 {
        self.samples.iter().filter(|s| s.correct).count() as u64
    }
}

/// Reads a samples file.
///
/// A last line without its newline that does not parse is what a kill leaves behind: it is
/// ignored with a warning. Any other bad line, and a repeated id, is an error naming the line.
pub fn read_samples(path: &Path) -> Result<Vec<ItemSamples>> {
    let mut text = String::new();
    File::open(path)
        .and_then(|mut f| f.read_to_string(&mut text))
        .map_err(|e| EvalError::io(path, e))?;
    Ok(parse_samples(path, &text)?.items)
}

/// Items of a samples file and where its last complete line ends.
struct Parsed {
    items: Vec<ItemSamples>,
    /// Byte length of the file without a truncated tail; equal to the text length when none.
    complete_len: usize,
}

fn parse_samples(path: &Path, text: &str) -> Result<Parsed> {
    let mut items = Vec::new();
    let mut first_line: HashMap<String, usize> = HashMap::new();
    let mut complete_len = 0;
    let mut offset = 0;
    for (index, raw) in text.split_inclusive('\n').enumerate() {
        let line_no = index + 1;
        let start = offset;
        offset += raw.len();
        let terminated = raw.ends_with('\n');
        let line = raw.trim_end_matches(['\n', '\r']);
        if line.trim().is_empty() {
            complete_len = offset;
            continue;
        }
        let item: ItemSamples = match serde_json::from_str(line) {
            Ok(item) => item,
            Err(e) if !terminated => {
                tracing::warn!(
                    "{}:{line_no}: ignoring a truncated last line ({} bytes, {e}), as an interrupted run leaves it",
                    path.display(),
                    line.len()
                );
                complete_len = start;
                break;
            }
            Err(e) => {
                return Err(EvalError::Line { path: path.to_path_buf(), line: line_no, problem: e.to_string() });
            }
        };
        if let Some(first) = first_line.insert(item.id.clone(), line_no) {
            return Err(EvalError::Line {
                path: path.to_path_buf(),
                line: line_no,
                problem: format!("id {:?} already appeared on line {first}", item.id),
            });
        }
        items.push(item);
        complete_len = offset;
    }
    Ok(Parsed { items, complete_len })
}

/// Appends items to a samples file, one flushed line each.
pub struct SamplesWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl SamplesWriter {
    /// Opens `path` for appending and returns the items it already holds.
    ///
    /// A truncated last line is cut off the file, so the next item starts on a fresh line; a
    /// complete last line that only lacks its newline gets one.
    pub fn open(path: &Path) -> Result<(Self, Vec<ItemSamples>)> {
        let existing = match std::fs::read_to_string(path) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(EvalError::io(path, e)),
        };
        let io = |e| EvalError::io(path, e);
        let file = OpenOptions::new().create(true).append(true).open(path).map_err(io)?;
        let mut items = Vec::new();
        if let Some(text) = existing {
            let parsed = parse_samples(path, &text)?;
            if parsed.complete_len < text.len() {
                file.set_len(parsed.complete_len as u64).map_err(io)?;
            }
            let kept = &text[..parsed.complete_len];
            if !kept.is_empty() && !kept.ends_with('\n') {
                (&file).write_all(b"\n").map_err(io)?;
            }
            items = parsed.items;
        }
        Ok((SamplesWriter { path: path.to_path_buf(), out: BufWriter::new(file) }, items))
    }

    /// Appends one item as one line and flushes it to the OS.
    pub fn append(&mut self, item: &ItemSamples) -> Result<()> {
        let mut line = serde_json::to_string(item).map_err(|e| EvalError::io(&self.path, std::io::Error::other(e)))?;
        line.push('\n');
        // One write of the whole line: a kill leaves either the full line or a truncated tail.
        self.out.write_all(line.as_bytes()).map_err(|e| EvalError::io(&self.path, e))?;
        self.out.flush().map_err(|e| EvalError::io(&self.path, e))
    }

    /// Flushes and asks the OS to put the appended lines on disk.
    pub fn sync(&mut self) -> Result<()> {
        self.out.flush().map_err(|e| EvalError::io(&self.path, e))?;
        self.out.get_ref().sync_data().map_err(|e| EvalError::io(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn judged(text: &str, correct: bool) -> Judged {
        Judged { text: text.into(), prediction: if correct { "A".into() } else { "B".into() }, correct, format_ok: true }
    }

    fn item(id: &str) -> ItemSamples {
        ItemSamples {
            id: id.into(),
            dataset: "d".into(),
            modality: "m".into(),
            answer_label: Some("A".into()),
            answer: "yes".into(),
            greedy: judged("<answer>A</answer>", true),
            samples: vec![judged("x", false), judged("<answer>A</answer>", true)],
        }
    }

    #[test]
    fn layout_is_the_documented_one() -> std::result::Result<(), serde_json::Error> {
        let v = serde_json::to_value(item("q1"))?;
        let keys: Vec<&str> = v.as_object().map(|o| o.keys().map(String::as_str).collect()).unwrap_or_default();
        let mut keys = keys;
        keys.sort_unstable();
        assert_eq!(keys, ["answer", "answer_label", "dataset", "greedy", "id", "modality", "samples"]);
        let mut sample_keys: Vec<String> = v["samples"][0].as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
        sample_keys.sort_unstable();
        assert_eq!(sample_keys, ["correct", "format_ok", "prediction", "text"]);
        assert_eq!(v["greedy"]["correct"], true);
        let free = ItemSamples { answer_label: None, ..item("q2") };
        assert!(serde_json::to_value(free)?["answer_label"].is_null());
        Ok(())
    }

    #[test]
    fn append_then_read_back() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| EvalError::io("tempdir", e))?;
        let path = dir.path().join("samples.jsonl");
        let (mut w, old) = SamplesWriter::open(&path)?;
        assert!(old.is_empty());
        w.append(&item("a"))?;
        w.append(&item("b"))?;
        w.sync()?;
        drop(w);
        assert_eq!(read_samples(&path)?, vec![item("a"), item("b")]);
        let (mut w, old) = SamplesWriter::open(&path)?;
        assert_eq!(old.len(), 2);
        w.append(&item("c"))?;
        drop(w);
        assert_eq!(read_samples(&path)?.len(), 3);
        Ok(())
    }

    #[test]
    fn truncated_tail_is_ignored_then_cut() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| EvalError::io("tempdir", e))?;
        let path = dir.path().join("samples.jsonl");
        let full = serde_json::to_string(&item("a")).map_err(|e| EvalError::Data(e.to_string()))?;
        let partial = serde_json::to_string(&item("b")).map_err(|e| EvalError::Data(e.to_string()))?;
        let cut = &partial[..partial.len() / 2];
        std::fs::write(&path, format!("{full}\n{cut}")).map_err(|e| EvalError::io(&path, e))?;
        assert_eq!(read_samples(&path)?, vec![item("a")]);
        let (mut w, old) = SamplesWriter::open(&path)?;
        assert_eq!(old, vec![item("a")]);
        w.append(&item("b"))?;
        drop(w);
        assert_eq!(read_samples(&path)?, vec![item("a"), item("b")]);
        Ok(())
    }

    #[test]
    fn complete_last_line_without_newline_is_kept() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| EvalError::io("tempdir", e))?;
        let path = dir.path().join("samples.jsonl");
        let full = serde_json::to_string(&item("a")).map_err(|e| EvalError::Data(e.to_string()))?;
        std::fs::write(&path, &full).map_err(|e| EvalError::io(&path, e))?;
        let (mut w, old) = SamplesWriter::open(&path)?;
        assert_eq!(old.len(), 1);
        w.append(&item("b"))?;
        drop(w);
        assert_eq!(read_samples(&path)?, vec![item("a"), item("b")]);
        Ok(())
    }

    #[test]
    fn bad_middle_line_and_repeated_ids_are_errors() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| EvalError::io("tempdir", e))?;
        let path = dir.path().join("samples.jsonl");
        let full = serde_json::to_string(&item("a")).map_err(|e| EvalError::Data(e.to_string()))?;
        std::fs::write(&path, format!("{{\"id\": 1\n{full}\n")).map_err(|e| EvalError::io(&path, e))?;
        let msg = read_samples(&path).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("samples.jsonl:1"), "{msg}");
        std::fs::write(&path, format!("{full}\n\n{full}\n")).map_err(|e| EvalError::io(&path, e))?;
        let msg = read_samples(&path).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains(":3") && msg.contains("line 1"), "{msg}");
        Ok(())
    }
}
