//! The learner's durable record of which groups it trained: `run_dir/consumed.jsonl`, one line per
//! optimizer step, appended and fsynced before the step is reported to the coordinator. With it a
//! restarted learner refuses a group it already trained even if the coordinator never heard
//! about that step.
//!
//! Steps newer than the checkpoint a learner resumes from were lost with it (their weights are
//! gone), so on open the log appends a `rewind` line that forgets them; the coordinator requeues
//! the same prompts when the learner syncs. Appending a marker rather than rewriting the file keeps
//! the log append-only, so a crash during the rewind cannot damage earlier lines.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::service::error::{ServiceError, ServiceResult};

/// File name of the log inside the run directory.
pub const CONSUMED_LOG: &str = "consumed.jsonl";

/// One trained group as the log records it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ConsumedGroup {
    /// The idempotency key the worker sent.
    pub group_id: String,
    /// Epoch of the prompt.
    pub epoch: u32,
    /// Record id of the prompt.
    pub prompt_id: String,
}

/// One line of the log.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Line {
    /// The step that produced `version` trained `groups`.
    Step { version: u64, groups: Vec<ConsumedGroup> },
    /// Forget every step newer than `to` (the learner resumed from a checkpoint at `to`).
    Rewind { to: u64 },
}

/// What the log holds, in memory, for duplicate checks.
#[derive(Debug, Default, Clone)]
pub struct ConsumedIndex {
    groups: HashMap<String, u64>,
    prompts: HashMap<(u32, String), u64>,
}

impl ConsumedIndex {
    /// Records that the step producing `version` trained `group`.
    pub fn insert(&mut self, version: u64, group: &ConsumedGroup) {
        self.groups.insert(group.group_id.clone(), version);
        self.prompts.insert((group.epoch, group.prompt_id.clone()), version);
    }

    fn rewind(&mut self, to: u64) {
        self.groups.retain(|_, v| *v <= to);
        self.prompts.retain(|_, v| *v <= to);
    }

    fn newest(&self) -> u64 {
        self.prompts.values().copied().max().unwrap_or(0)
    }

    /// True when a group with this id was trained.
    pub fn has_group(&self, group_id: &str) -> bool {
        self.groups.contains_key(group_id)
    }

    /// True when a group of this prompt was trained in this epoch.
    pub fn has_prompt(&self, epoch: u32, prompt_id: &str) -> bool {
        // A borrowed tuple key cannot be looked up without building the owned key.
        self.prompts.contains_key(&(epoch, prompt_id.to_string()))
    }

    /// Number of trained (epoch, prompt) pairs.
    pub fn len(&self) -> usize {
        self.prompts.len()
    }

    /// True when nothing was trained.
    pub fn is_empty(&self) -> bool {
        self.prompts.is_empty()
    }

    /// Trained prompt ids by epoch, in a stable order.
    pub fn prompts_by_epoch(&self) -> BTreeMap<u32, Vec<String>> {
        let mut out: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for (epoch, prompt) in self.prompts.keys() {
            out.entry(*epoch).or_default().push(prompt.clone());
        }
        for prompts in out.values_mut() {
            prompts.sort();
        }
        out
    }
}

/// The open log, appended to by the step loop.
#[derive(Debug)]
pub struct ConsumedLog {
    path: PathBuf,
    file: File,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ServiceError + '_ {
    move |source| ServiceError::io(path, source)
}

impl ConsumedLog {
    /// Opens (or creates) the log, replays it, and forgets steps newer than `resume_version`.
    /// Returns the log and its index.
    pub fn open(path: &Path, resume_version: u64) -> ServiceResult<(ConsumedLog, ConsumedIndex)> {
        let _span = tracing::info_span!("consumed_log_open", path = %path.display(), resume_version).entered();
        let text = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(ServiceError::io(path, e)),
        };
        // Bytes after the last newline are a line whose write was cut by a crash; it was never
        // fsynced as a whole, so its step was never reported and is dropped.
        let complete = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let mut index = ConsumedIndex::default();
        for (n, line) in text[..complete].split(|&b| b == b'\n').enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let parsed: Line = serde_json::from_slice(line)
                .map_err(|e| ServiceError::ConsumedLog { path: path.to_path_buf(), line: n + 1, problem: e.to_string() })?;
            match parsed {
                Line::Step { version, groups } => groups.iter().for_each(|g| index.insert(version, g)),
                Line::Rewind { to } => index.rewind(to),
            }
        }
        let existed = !text.is_empty();
        if complete < text.len() {
            tracing::warn!(dropped_bytes = text.len() - complete, "dropping a torn last line of the consumed log");
            let file = OpenOptions::new().write(true).open(path).map_err(io(path))?;
            file.set_len(complete as u64).map_err(io(path))?;
            file.sync_all().map_err(io(path))?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path).map_err(io(path))?;
        if !existed {
            sync_parent(path)?;
        }
        let mut log = ConsumedLog { path: path.to_path_buf(), file };
        if index.newest() > resume_version {
            tracing::info!(newest = index.newest(), resume_version, "forgetting steps lost with the previous learner");
            log.write_line(&Line::Rewind { to: resume_version })?;
            index.rewind(resume_version);
        }
        tracing::info!(trained = index.len(), "consumed log replayed");
        Ok((log, index))
    }

    /// Durably records that the step producing `version` trained `groups`.
    pub fn append(&mut self, version: u64, groups: &[ConsumedGroup]) -> ServiceResult<()> {
        self.write_line(&Line::Step { version, groups: groups.to_vec() })
    }

    fn write_line(&mut self, line: &Line) -> ServiceResult<()> {
        let mut text = serde_json::to_string(line).map_err(|e| ServiceError::io(&self.path, std::io::Error::other(e)))?;
        text.push('\n');
        // One write of the whole line, then fsync: the line is durable before anyone is told.
        self.file.write_all(text.as_bytes()).map_err(io(&self.path))?;
        self.file.sync_data().map_err(io(&self.path))
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Makes a new file's directory entry durable.
fn sync_parent(path: &Path) -> ServiceResult<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(epoch: u32, prompt: &str, attempt: u64) -> ConsumedGroup {
        ConsumedGroup { group_id: medrl_proto::group_id(epoch, prompt, attempt), epoch, prompt_id: prompt.into() }
    }

    #[test]
    fn replay_rewind_and_torn_tail() -> ServiceResult<()> {
        let dir = tempfile::tempdir().map_err(|e| ServiceError::io("tempdir", e))?;
        let path = dir.path().join(CONSUMED_LOG);
        {
            let (mut log, index) = ConsumedLog::open(&path, 0)?;
            assert!(index.is_empty());
            log.append(1, &[group(0, "a", 1), group(0, "b", 1)])?;
            log.append(2, &[group(0, "c", 1)])?;
            log.append(3, &[group(0, "d", 1)])?;
        }
        // A crash in the middle of writing a fourth line.
        let mut f = OpenOptions::new().append(true).open(&path).map_err(io(&path))?;
        f.write_all(br#"{"kind":"step","version":4,"gro"#).map_err(io(&path))?;
        drop(f);

        // Resuming from a checkpoint at version 2: steps 3 (and the torn 4) are forgotten.
        let (mut log, index) = ConsumedLog::open(&path, 2)?;
        assert!(index.has_prompt(0, "a") && index.has_prompt(0, "c"));
        assert!(index.has_group(&medrl_proto::group_id(0, "b", 1)));
        assert!(!index.has_prompt(0, "d"), "step 3 was lost with the learner");
        assert_eq!(index.len(), 3);
        // The retrained version 3 is a different step; an old entry must not come back.
        log.append(3, &[group(0, "e", 2)])?;
        drop(log);
        let (_, index) = ConsumedLog::open(&path, 3)?;
        assert!(index.has_prompt(0, "e") && !index.has_prompt(0, "d"));
        assert_eq!(index.prompts_by_epoch().get(&0).map(Vec::len), Some(4));

        std::fs::write(&path, "{\"kind\":\"step\",\"version\":1,\"groups\":[]}\nnot json\n").map_err(io(&path))?;
        let err = ConsumedLog::open(&path, 5).expect_err("corrupt middle line");
        assert!(err.to_string().contains(":2:"), "{err}");
        Ok(())
    }
}
