//! `support.jsonl` beside the journal: one JSON line with the per-modality support map each time
//! an epoch completes, so the map reaches the run directory (plots, people) and not only the
//! Prometheus gauges. Written whenever the coordinator has a journal, with or without
//! support-aware skipping: the pass rates are observed either way.
//!
//! A line: `{"epoch": 0, "time": 1.7e9, "done": false, "classes": ["unseen", "zero", "partial",
//! "saturated"], "modalities": [{"modality": "ct", "counts": [0, 3, 5, 2], "mean_pass_rate": 0.4}]}`
//! with `counts` in `classes` order and `mean_pass_rate` null for a modality with no observation.
//! Epochs already complete when a coordinator starts are not written again; readers keep the
//! last line.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::core::Core;
use crate::support::SupportClass;

/// File name of the support snapshots, in the journal's folder.
pub const SUPPORT_JSONL: &str = "support.jsonl";

/// Where the snapshots of a coordinator with `journal` go.
pub fn support_log_path(journal: &Path) -> PathBuf {
    journal.with_file_name(SUPPORT_JSONL)
}

/// Tracks which completed epochs still need a snapshot.
#[derive(Debug)]
pub struct SupportLog {
    path: PathBuf,
    next_epoch: u32,
}

impl SupportLog {
    /// A log for the coordinator journalling to `journal`; epochs complete in `core` already
    /// (a restart) are taken as written.
    pub fn new(journal: &Path, core: &Core) -> SupportLog {
        SupportLog { path: support_log_path(journal), next_epoch: completed_prefix(core) }
    }

    /// The lines due for epochs that completed since the last call (empty most of the time).
    pub fn due(&mut self, core: &Core) -> Vec<String> {
        let complete = completed_prefix(core);
        let mut lines = Vec::new();
        while self.next_epoch < complete {
            lines.push(snapshot_line(core, self.next_epoch));
            self.next_epoch += 1;
        }
        lines
    }

    /// Appends `lines`; a failure is logged, never fatal (the snapshots are for reading only).
    pub fn append(&self, lines: &[String]) {
        if lines.is_empty() {
            return;
        }
        let result = std::fs::OpenOptions::new().create(true).append(true).open(&self.path).and_then(|mut f| {
            let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
            f.write_all(text.as_bytes())
        });
        if let Err(e) = result {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot append the support snapshot");
        }
    }
}

/// Epochs 0..n that are all complete (epochs complete in order of opening in practice; a gap
/// waits for the earlier one).
fn completed_prefix(core: &Core) -> u32 {
    core.epochs().iter().take_while(|e| e.is_complete()).count() as u32
}

fn snapshot_line(core: &Core, epoch: u32) -> String {
    let time = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    let modalities: Vec<serde_json::Value> = core
        .support_map()
        .into_iter()
        .map(|m| serde_json::json!({"modality": m.modality, "counts": m.counts, "mean_pass_rate": m.mean_pass_rate}))
        .collect();
    let classes: Vec<&str> = SupportClass::ALL.iter().map(|c| c.as_str()).collect();
    serde_json::json!({"epoch": epoch, "time": time, "done": core.is_done(), "classes": classes, "modalities": modalities}).to_string()
}
