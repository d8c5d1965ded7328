//! Loaders that turn the project's datasets into [`VqaRecord`](crate::VqaRecord)s, and the
//! record-level tools that build training sets from them (balanced subsets, pass-rate filters).
//!
//! One file per source format; facts about the formats are in `shared/reference/datasets.md`.

pub mod error;
pub mod eval_jsonl;
pub mod filter;
pub mod llava;
pub mod medmnist;
pub mod paths;
pub mod pmc_vqa;
pub mod subset;

pub use error::DataError;
