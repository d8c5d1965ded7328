//! Everything an evaluation writes besides the samples themselves, computed from the samples
//! alone so that `medrl eval --samples` and a model run produce identical files.

use std::path::{Path, PathBuf};

use crate::error::{EvalError, Result};
use crate::metrics::{Metrics, compute_metrics};
use crate::plot::plot_pass_at_k;
use crate::report::{SupportRow, SupportThresholds, write_support_gap};
use crate::samples::ItemSamples;

/// What [`write_outputs`] produced.
#[derive(Debug, Clone)]
pub struct Outputs {
    /// The metrics written to `metrics.json` / `metrics.md`.
    pub metrics: Metrics,
    /// The rows of `support_gap.md` / `support_gap.json`.
    pub support: Vec<SupportRow>,
    /// Every file written.
    pub files: Vec<PathBuf>,
}

/// Writes `metrics.json`, `metrics.md`, `support_gap.md`, `support_gap.json`, `passk.png` and
/// `passk.svg` into `dir` (created if missing).
pub fn write_outputs(items: &[ItemSamples], dir: &Path, thresholds: &SupportThresholds) -> Result<Outputs> {
    std::fs::create_dir_all(dir).map_err(|e| EvalError::io(dir, e))?;
    let metrics = compute_metrics(items)?;
    metrics.write(dir)?;
    let support = write_support_gap(dir, &metrics, items, thresholds)?;
    plot_pass_at_k(&metrics, &dir.join("passk"))?;
    let files = ["metrics.json", "metrics.md", "support_gap.md", "support_gap.json", "passk.png", "passk.svg"].iter().map(|f| dir.join(f)).collect();
    Ok(Outputs { metrics, support, files })
}
