//! The run's datasets: record files given in the config, or the synthetic task generated into
//! the run directory.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use medrl_vqa::synthetic::{Family, SyntheticSpec, write_synthetic};
use medrl_vqa::{VqaRecord, read_records};
use serde::{Deserialize, Serialize};

/// Settings of the generated synthetic task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyntheticSection {
    /// Prompts of the RL phase.
    pub rl_size: usize,
    /// Items with gold responses for the SFT phase.
    pub sft_size: usize,
    pub eval_size: usize,
    pub seed: u64,
    /// Canvas side in pixels (a multiple of 28).
    pub canvas: u32,
    /// Task families, e.g. shape, colour, position, count, colour_count.
    pub families: Vec<String>,
    /// Drop the options: the answer is the word itself (`red`), judged as free text. A tiny
    /// model learns image -> word far sooner than image -> option text -> shuffled letter.
    pub open_ended: bool,
}

impl Default for SyntheticSection {
    fn default() -> Self {
        SyntheticSection { rl_size: 80, sft_size: 640, eval_size: 64, seed: 1, canvas: 56, families: ["shape", "colour", "position", "count"].map(String::from).to_vec(), open_ended: true }
    }
}

/// The `data` section: where each phase's records come from (`synthetic` or a JSONL path).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataSection {
    /// Prompts of the RL phase.
    pub train: String,
    /// Gold responses for SFT; none skips SFT.
    pub sft: Option<String>,
    /// Held-out items for Acc@1 / Pass@K; none skips evaluation.
    pub eval: Option<String>,
    pub synthetic: SyntheticSection,
}

impl Default for DataSection {
    fn default() -> Self {
        DataSection { train: "synthetic".into(), sft: Some("synthetic".into()), eval: Some("synthetic".into()), synthetic: SyntheticSection::default() }
    }
}

/// Records of one phase and the folder their image paths are relative to.
pub struct Split {
    pub records: Vec<VqaRecord>,
    pub file: PathBuf,
}

impl Split {
    /// The folder image paths are relative to.
    pub fn base(&self) -> PathBuf {
        self.file.parent().map(Path::to_path_buf).unwrap_or_default()
    }
}

/// Loads or generates one phase's records; `which` names the phase and its synthetic file.
pub fn load_split(source: &str, which: &str, size: usize, seed_offset: u64, s: &SyntheticSection, run_dir: &Path) -> Result<Split> {
    if source != "synthetic" {
        let file = PathBuf::from(source);
        let records = read_records(&file).with_context(|| format!("data.{which}"))?;
        return Ok(Split { records, file });
    }
    let families = s.families.iter().map(|f| f.parse::<Family>().map_err(anyhow::Error::msg)).collect::<Result<Vec<_>>>().context("data.synthetic.families")?;
    let dir = run_dir.join("data");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let spec = SyntheticSpec { count: size, seed: s.seed.wrapping_add(seed_offset), canvas: s.canvas, families, image_prefix: format!("images/{which}") };
    let mut records = write_synthetic(&spec, &dir).with_context(|| format!("generating synthetic {which} data"))?;
    if s.open_ended {
        for r in &mut records {
            r.options.clear();
            r.answer_label = None;
        }
    }
    let file = dir.join(format!("{which}.jsonl"));
    medrl_vqa::write_records(&file, &records)?;
    Ok(Split { records, file })
}
