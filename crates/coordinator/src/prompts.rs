//! The prompt set a run trains on: the dataset records, their folder (images are relative to it),
//! an id index, and a digest that ties a journal to exactly this set in this order.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use medrl_vqa::VqaRecord;
use sha2::{Digest, Sha256};

use crate::error::CoordinatorError;

/// The records of a run, addressed by index (position in the file) or by record id.
#[derive(Debug)]
pub struct PromptSet {
    records: Vec<VqaRecord>,
    base_dir: PathBuf,
    index: HashMap<String, u32>,
    digest: String,
}

impl PromptSet {
    /// Takes records whose image paths are relative to `base_dir`; ids must be unique.
    pub fn new(records: Vec<VqaRecord>, base_dir: impl Into<PathBuf>) -> Result<PromptSet, CoordinatorError> {
        if records.is_empty() {
            return Err(CoordinatorError::Prompts("the prompt set is empty".into()));
        }
        if u32::try_from(records.len()).is_err() {
            return Err(CoordinatorError::Prompts(format!("{} prompts is more than 2^32", records.len())));
        }
        let mut index = HashMap::with_capacity(records.len());
        let mut hasher = Sha256::new();
        for (i, record) in records.iter().enumerate() {
            if record.id.is_empty() {
                return Err(CoordinatorError::Prompts(format!("record {} has an empty id", i + 1)));
            }
            if let Some(first) = index.insert(record.id.clone(), i as u32) {
                return Err(CoordinatorError::Prompts(format!(
                    "records {} and {} share the id {:?}; ids must be unique",
                    first + 1,
                    i + 1,
                    record.id
                )));
            }
            hasher.update(record.id.as_bytes());
            hasher.update(b"\n");
        }
        Ok(PromptSet { records, base_dir: base_dir.into(), index, digest: hex::encode(hasher.finalize()) })
    }

    /// Reads a JSONL file of records; images resolve against the file's folder.
    pub fn from_jsonl(path: &Path) -> Result<PromptSet, CoordinatorError> {
        let records = medrl_vqa::read_records(path)?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        PromptSet::new(records, base)
    }

    /// Number of prompts.
    pub fn len(&self) -> u32 {
        self.records.len() as u32
    }

    /// True when there are no prompts (never, for a constructed set).
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The record at an index.
    pub fn get(&self, index: u32) -> Option<&VqaRecord> {
        self.records.get(index as usize)
    }

    /// The index of a record id.
    pub fn index_of(&self, id: &str) -> Option<u32> {
        self.index.get(id).copied()
    }

    /// The folder image paths are relative to.
    pub fn base_dir(&self) -> &Path {
        &self.base_dir
    }

    /// Hex sha256 of the ids in file order: a journal only resumes on the same set and order.
    pub fn digest(&self) -> &str {
        &self.digest
    }
}
